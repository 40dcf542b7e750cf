"""Text sources -> tokenised, packed, document-split datasets, and a resumable batch iterator.

Pipeline: enumerate files (sorted, so filesystem order never matters) -> load documents with HF `datasets`
(a text file is one document, a jsonl/parquet/saved-dataset row is one document) -> assign each document to
train or validation by a seeded hash (so no document, and hence no window, straddles the split) -> tokenise with
the model's tokenizer, EOS after every document -> concatenate and cut into full `seq_len` windows (no padding,
the remainder is dropped).

`ResumableBatches` serves windows in an epoch-seeded order; its `{epoch, position}` state is enough to resume
exactly, because the order of every epoch is a pure function of (seed, epoch, rank, world_size).
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

STDLIB = "stdlib"
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = "*?["
# Tokenising a capped corpus grows the tokenised prefix geometrically from this many documents, so a small
# `max_tokens` never pays for tokenising a large corpus.
_FIRST_PREFIX_DOCS = 64


@dataclass
class DataConfig:
    """Where text comes from and how it is split. Fields are OmegaConf-compatible (Hydra structured config)."""

    # Files, folders (recursive) or globs; "stdlib" = the .py sources of this Python's standard library.
    sources: list[str] = field(default_factory=lambda: [STDLIB])
    # File name endings that folders and globs contribute; a file named explicitly is always read.
    extensions: list[str] = field(default_factory=lambda: ["txt", "md", "rst", "py", "jsonl", "parquet"])
    text_field: str = "text"  # column holding the document in jsonl/parquet/saved datasets
    saved_dataset: str | None = None  # a `datasets.save_to_disk` directory (used instead of `sources`)
    max_files: int | None = None  # first N files in sorted order
    max_tokens: int | None = None  # cap on train + validation tokens, shared by validation_fraction
    validation_fraction: float = 0.01
    seed: int = 0
    num_proc: int = 1
    cache_dir: str | None = None  # datasets cache; None = datasets' default (HF_DATASETS_CACHE)

    def __post_init__(self) -> None:
        _validate(self)


@dataclass
class PackedSplits:
    """Both splits hold one column `input_ids` of exactly `seq_len` int32 token ids per row."""

    train: datasets.Dataset
    validation: datasets.Dataset
    seq_len: int
    num_documents: dict[str, int]  # documents assigned to each split (before any max_tokens cap)


@dataclass(frozen=True)
class _SourceFile:
    path: str  # absolute path, what is read
    key: str  # path relative to its source root: what the split hashes, so moving the data keeps the split


def document_split(key: str, seed: int, validation_fraction: float) -> str:
    """'train' or 'validation' for one document, from a seeded hash of its key (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    unit = int.from_bytes(digest, "big") / 2**64
    return "validation" if unit < validation_fraction else "train"


def source_files(cfg: DataConfig) -> list[str]:
    """The files `build_datasets` reads from `cfg.sources`, in the (sorted) order it reads them."""
    return [f.path for f in _selected_files(cfg)]


def build_datasets(cfg: DataConfig, tokenizer: Any, seq_len: int) -> PackedSplits:
    """Load, split by document, tokenise and pack the configured text into `seq_len` windows."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is invalid: use an integer >= 1")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token: documents are separated by EOS, "
            "so use the model's own tokenizer (or set tokenizer.eos_token)"
        )
    by_split: dict[str, list[datasets.Dataset]] = {"train": [], "validation": []}
    for documents, assignment in _load_documents(cfg):
        for split in by_split:
            rows = [row for row, assigned in enumerate(assignment) if assigned == split]
            if rows:
                by_split[split].append(documents.select(rows))

    caps = _split_token_caps(cfg.max_tokens, cfg.validation_fraction)
    tokenize = _Tokenize(tokenizer, eos_id)
    num_documents = {split: sum(len(piece) for piece in pieces) for split, pieces in by_split.items()}
    streams = {
        split: _tokenize(pieces, tokenize, caps[split], cfg.num_proc)[: caps[split]]
        for split, pieces in by_split.items()
    }
    if all(stream.size == 0 for stream in streams.values()):
        where = f"data.saved_dataset={cfg.saved_dataset}" if cfg.saved_dataset else f"data.sources={list(cfg.sources)}"
        raise ValueError(f"no text in {where}: every document is empty; point it at files or rows with text")
    windows = {}
    for split, stream in streams.items():
        windows[split] = _pack(stream, seq_len)
        _require_windows(split, windows[split], stream.size, num_documents[split], seq_len, cfg)
    return PackedSplits(windows["train"], windows["validation"], seq_len, num_documents)


class ResumableBatches:
    """Endless batches over packed windows, resumable from `state_dict()` to the exact next batch.

    Epoch e shuffles all windows with `torch.Generator` seeded `seed + e`; every rank drops the same tail so the
    epoch divides evenly (ranks must take the same number of steps or collectives hang), then takes the strided
    share `perm[rank::world_size]`. The state is advanced *before* a batch is handed out, so a checkpoint taken
    after consuming batch n resumes at batch n + 1.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: use an integer >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside world_size={world_size}: use 0 <= rank < world_size")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self._dataset = dataset.with_format("torch", columns=["input_ids"])
        self.samples_per_rank = len(dataset) // world_size
        rounding = math.floor if drop_last else math.ceil
        self.batches_per_epoch = int(rounding(self.samples_per_rank / batch_size))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} windows over world_size={world_size} give no full batch of {batch_size} per rank: "
                "add data (data.max_tokens / data.max_files) or lower the batch size"
            )
        self.epoch = 0
        self.position = 0  # batches already handed out in `epoch` on this rank

    def _rank_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(len(self._dataset), generator=generator)
        return permutation[: self.samples_per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            order = self._rank_order(self.epoch)
            while self.position < self.batches_per_epoch:
                start = self.position * self.batch_size
                indices = order[start : start + self.batch_size].tolist()
                self.position += 1
                # Packed windows are all real tokens: no attention mask, so no layer builds a [T, T] mask and the
                # attention runs its plain causal kernel. (Batches that really pad come from collate_padded.)
                yield {"input_ids": self._dataset[indices]["input_ids"].long()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(
                f"data state epoch={epoch} position={position} does not fit {self.batches_per_epoch} batches per "
                "epoch: the data, batch size or world size changed since the checkpoint; resume with the same ones"
            )
        self.epoch, self.position = epoch, position


def collate_padded(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad variable-length token lists to `input_ids` [b, T] long and `attention_mask` [b, T] (0 = pad)."""
    if not sequences:
        raise ValueError("collate_padded got no sequences: pass at least one token list")
    rows = [torch.as_tensor(seq, dtype=torch.long).reshape(-1) for seq in sequences]
    width = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : row.numel()] = row
        attention_mask[i, : row.numel()] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ---- configuration checks -----------------------------------------------------------------------------------


def _validate(cfg: DataConfig) -> None:
    """Every check of a data config, run when it is built (before anything is loaded or written)."""
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ValueError(f"data.validation_fraction={cfg.validation_fraction} is invalid: use a value in [0, 1)")
    for name in ("max_files", "max_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"data.{name}={value} is invalid: use an integer >= 1, or null for no cap")
    if cfg.num_proc < 1:
        raise ValueError(f"data.num_proc={cfg.num_proc} is invalid: use an integer >= 1")
    if cfg.saved_dataset and cfg.sources:
        # Both at once would silently mix the default stdlib corpus into a user's saved dataset.
        raise ValueError(
            f"data.saved_dataset={cfg.saved_dataset} and data.sources={list(cfg.sources)} are both set: "
            "use one (add data.sources=[] to read only the saved dataset)"
        )
    if not cfg.saved_dataset and not cfg.sources:
        raise ValueError("data.sources is empty and data.saved_dataset is unset: name at least one (e.g. [stdlib])")
    if cfg.saved_dataset and not Path(cfg.saved_dataset).is_dir():
        raise ValueError(
            f"data.saved_dataset={cfg.saved_dataset} does not exist: fix the path (a folder written by save_to_disk)"
        )
    for source in cfg.sources:
        if source == STDLIB:
            continue
        expanded = os.path.expanduser(source)
        if any(c in expanded for c in _GLOB_CHARS):
            if not glob.glob(expanded, recursive=True):
                raise ValueError(f"data.sources entry '{source}' matched no files: check the pattern")
        elif not Path(expanded).exists():
            raise ValueError(f"data.sources entry {source} does not exist: fix the path or remove it")


def _split_token_caps(max_tokens: int | None, validation_fraction: float) -> dict[str, int | None]:
    # Each split gets its share of the cap, so a small cap still leaves a validation set.
    if max_tokens is None:
        return {"train": None, "validation": None}
    validation = round(max_tokens * validation_fraction)
    return {"train": max_tokens - validation, "validation": validation}


def _require_windows(
    split: str, windows: datasets.Dataset, num_tokens: int, num_docs: int, seq_len: int, cfg: DataConfig
) -> None:
    if len(windows) > 0 or (split == "validation" and cfg.validation_fraction == 0.0):
        return
    raise ValueError(
        f"the {split} split has {num_tokens} tokens from {num_docs} documents, less than one seq_len={seq_len} "
        "window: add text, raise data.max_tokens / data.max_files / data.validation_fraction, or lower seq_len"
    )


# ---- enumerating and loading documents ----------------------------------------------------------------------


def _load_documents(cfg: DataConfig) -> list[tuple[datasets.Dataset, list[str]]]:
    """(documents with one `text` column, the split of each row) per input kind, in a fixed order."""

    def split_of(key: str) -> str:
        return document_split(key, cfg.seed, cfg.validation_fraction)

    if cfg.saved_dataset:
        saved = _load_saved(cfg.saved_dataset, cfg.text_field)
        return [(saved, _split_by_content(saved, split_of))]

    files = _selected_files(cfg)
    text_files = [f for f in files if not f.path.endswith(_JSON_SUFFIXES + _PARQUET_SUFFIXES)]
    json_files = [f for f in files if f.path.endswith(_JSON_SUFFIXES)]
    parquet_files = [f for f in files if f.path.endswith(_PARQUET_SUFFIXES)]
    num_proc = cfg.num_proc if cfg.num_proc > 1 else None

    parts = []
    if text_files:
        # One row per file ("document"); undecodable bytes become U+FFFD instead of failing the whole corpus.
        documents = _load_builder(
            "text", text_files, cfg.cache_dir, num_proc, sample_by="document", encoding_errors="replace"
        )
        assert len(documents) == len(text_files), "the text builder must yield exactly one row per file"
        parts.append((documents, [split_of(f.key) for f in text_files]))
    for builder, group in (("json", json_files), ("parquet", parquet_files)):
        if group:
            rows = _text_column(_load_builder(builder, group, cfg.cache_dir, num_proc), cfg.text_field, group[0].path)
            parts.append((rows, _split_by_content(rows, split_of)))
    return parts


def _selected_files(cfg: DataConfig) -> list[_SourceFile]:
    files = _enumerate_sources(list(cfg.sources), list(cfg.extensions))
    return files if cfg.max_files is None else files[: cfg.max_files]


def _enumerate_sources(sources: list[str], extensions: list[str]) -> list[_SourceFile]:
    suffixes = tuple("." + ext.lstrip(".") for ext in extensions)
    found: dict[str, _SourceFile] = {}
    for source in sources:
        matched = _expand_source(str(source), suffixes)
        if not matched:
            raise ValueError(
                f"data.sources entry '{source}' matched no files ending in {list(suffixes)}: "
                "check the path or data.extensions"
            )
        for item in matched:
            found.setdefault(item.path, item)
    return [found[path] for path in sorted(found)]


def _expand_source(source: str, suffixes: tuple[str, ...]) -> list[_SourceFile]:
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        # The stdlib folder usually holds the base interpreter's site-packages (and Debian's dist-packages):
        # installed third-party code is not the stdlib. Inside a venv, sysconfig's purelib names the venv's own
        # site-packages instead, so the folders are skipped by name, never by asking sysconfig.
        return [
            _SourceFile(str(path), "stdlib/" + path.relative_to(root).as_posix())
            for path in _walk(root, (".py",), skip_names=_THIRD_PARTY_FOLDERS)
        ]
    expanded = os.path.expanduser(source)
    if any(char in expanded for char in _GLOB_CHARS):
        root = _glob_root(expanded)
        matches = [os.path.abspath(p) for p in glob.glob(expanded, recursive=True)]
        return [
            _SourceFile(p, Path(os.path.relpath(p, root)).as_posix())
            for p in matches
            if os.path.isfile(p) and p.endswith(suffixes)
        ]
    path = Path(expanded)
    if path.is_file():
        return [_SourceFile(str(path.resolve()), path.name)]
    if path.is_dir():
        root = path.resolve()
        return [_SourceFile(str(p), p.relative_to(root).as_posix()) for p in _walk(root, suffixes)]
    raise ValueError(
        f"data.sources entry '{source}' does not exist: give an existing file, folder or glob, or '{STDLIB}'"
    )


_THIRD_PARTY_FOLDERS = frozenset({"site-packages", "dist-packages"})


def _walk(root: Path, suffixes: tuple[str, ...], skip_names: frozenset[str] = frozenset()) -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(root):
        # Hidden folders (.git, .cache ...) hold tooling state, not corpus text.
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skip_names]
        files += [Path(folder, n) for n in names if n.endswith(suffixes) and not n.startswith(".")]
    return files


def _glob_root(pattern: str) -> str:
    """The folder before the first wildcard: glob matches are keyed relative to it."""
    static: list[str] = []
    for part in Path(os.path.abspath(pattern)).parts:
        if any(char in part for char in _GLOB_CHARS):
            break
        static.append(part)
    return str(Path(*static))


def _load_builder(
    builder: str, files: list[_SourceFile], cache_dir: str | None, num_proc: int | None, **options: Any
) -> datasets.Dataset:
    # datasets treats data_files as glob patterns; escaping makes names like "a[1].txt" literal.
    data_files = [glob.escape(f.path) for f in files]
    return datasets.load_dataset(
        builder, data_files=data_files, split="train", cache_dir=cache_dir, num_proc=num_proc, **options
    )


def _load_saved(path: str, text_field: str) -> datasets.Dataset:
    if not os.path.isdir(path):
        raise ValueError(
            f"data.saved_dataset={path} does not exist: give a directory written by datasets' save_to_disk"
        )
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise ValueError(
            f"data.saved_dataset={path} is not a saved dataset ({error}): give a directory written by save_to_disk"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        # Our own seeded document split replaces whatever splits the saved dataset had.
        loaded = datasets.concatenate_datasets([loaded[name] for name in sorted(loaded)])
    return _text_column(loaded, text_field, path)


def _text_column(table: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in table.column_names:
        raise ValueError(
            f"{where} has no column '{text_field}' (columns: {table.column_names}): "
            "set data.text_field to the text column"
        )
    feature = table.features[text_field]
    if not isinstance(feature, datasets.Value) or feature.dtype not in ("string", "large_string"):
        raise ValueError(
            f"{where} column '{text_field}' holds {feature}, not text: set data.text_field to a text column"
        )
    table = table.select_columns([text_field])
    if text_field != "text":
        table = table.rename_column(text_field, "text")
    return table.cast_column("text", datasets.Value("string"))


def _split_by_content(rows: datasets.Dataset, split_of: Callable[[str], str]) -> list[str]:
    # Rows have no stable path of their own, so the split hashes their text; duplicates land on one side.
    return [split_of(text or "") for batch in rows.iter(batch_size=4096) for text in batch["text"]]


# ---- tokenising and packing ---------------------------------------------------------------------------------


class _Tokenize:
    """Batched map function: token ids of each document followed by EOS; empty documents vanish."""

    def __init__(self, tokenizer: Any, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __call__(self, batch: dict[str, list[str | None]]) -> dict[str, list[list[int]]]:
        texts = [text or "" for text in batch["text"]]
        # verbose=False: long documents are expected here (they are packed later), so no length warnings.
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
        pairs = zip(encoded["input_ids"], texts, strict=True)
        return {"input_ids": [[*ids, self.eos_id] if text else [] for ids, text in pairs]}


def _tokenize(pieces: list[datasets.Dataset], tokenize: _Tokenize, cap: int | None, num_proc: int) -> np.ndarray:
    """The concatenated token stream of the documents, in order; with a cap, at least `cap` tokens if available."""
    if not pieces or cap == 0:
        return np.zeros(0, dtype=np.int32)
    documents = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    count = len(documents) if cap is None else min(len(documents), _FIRST_PREFIX_DOCS)
    while True:
        prefix = documents if count == len(documents) else documents.select(range(count))
        tokenized = prefix.map(
            tokenize,
            batched=True,
            batch_size=256,
            remove_columns=prefix.column_names,
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
            num_proc=num_proc if num_proc > 1 and len(prefix) >= num_proc else None,
            desc="tokenising",
        )
        stream = _flatten(tokenized)
        if cap is None or stream.size >= cap or count == len(documents):
            return stream
        count = min(len(documents), count * 4)


def _flatten(tokenized: datasets.Dataset) -> np.ndarray:
    # Arrow's flatten is one contiguous copy of the ids: no Python loop over tokens.
    column = tokenized.with_format("arrow")[:]["input_ids"].combine_chunks()
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def _pack(stream: np.ndarray, seq_len: int) -> datasets.Dataset:
    num_windows = stream.size // seq_len
    values = pa.array(np.ascontiguousarray(stream[: num_windows * seq_len], dtype=np.int32))
    windows = pa.FixedSizeListArray.from_arrays(values, seq_len)
    return datasets.Dataset(pa.table({"input_ids": windows}))
