"""Where the text comes from: `DataConfig` (`data.*`), the files and rows it names, and each document's split.

Files are enumerated sorted (filesystem order never matters); a text file is one document, a jsonl/parquet/
saved-dataset row is one document; each document goes to train or validation by a seeded hash of its key.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

STDLIB = "stdlib"
_JSON_SUFFIXES = (".jsonl", ".json")
_PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = "*?["


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


# ---- enumerating and loading documents ----------------------------------------------------------------------


def load_documents(cfg: DataConfig) -> list[tuple[datasets.Dataset, list[str]]]:
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
        _refuse_binary(text_files)
        # One row per file ("document"); undecodable bytes become U+FFFD instead of failing the whole corpus.
        documents = _load_builder(
            "text", text_files, cfg.cache_dir, num_proc, sample_by="document", encoding_errors="replace"
        )
        assert len(documents) == len(text_files), "the text builder must yield exactly one row per file"
        parts.append((documents, [split_of(f.key) for f in text_files]))
    for builder, group in (("json", json_files), ("parquet", parquet_files)):
        if group:
            try:
                loaded = _load_builder(builder, group, cfg.cache_dir, num_proc)
            except datasets.exceptions.DatasetGenerationError as error:
                raise _unreadable(builder, group, error) from None
            rows = _text_column(loaded, cfg.text_field, group[0].path)
            parts.append((rows, _split_by_content(rows, split_of)))
    return parts


_SNIFF_BYTES = 8192  # a NUL byte this early marks a binary file (git's test for binary content)


def _refuse_binary(files: list[_SourceFile]) -> None:
    """A file with a text ending that holds binary data would be tokenised as replacement characters: refuse it."""
    for item in files:
        with open(item.path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
        nul = head.find(b"\0")
        if nul >= 0:
            raise ValueError(
                f"data file {item.path} is binary (a NUL byte at offset {nul}), not text: remove it "
                "from data.sources or leave its ending out of data.extensions"
            )


def _unreadable(builder: str, files: list[_SourceFile], error: Exception) -> ValueError:
    """One line naming the file (and line) that `datasets` could not read, instead of its traceback."""
    if builder == "json":
        for item in files:
            found = _first_bad_json_line(Path(item.path))
            if found is not None:
                line, problem = found
                return ValueError(
                    f"data file {item.path} line {line} is not valid JSON ({problem}): fix or remove that line"
                )
    cause = error.__cause__ or error
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    names = ", ".join(item.path for item in files[:3]) + (" ..." if len(files) > 3 else "")
    return ValueError(f"data files {names} could not be read as {builder} ({first}): fix or remove the bad file")


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, error) of the first line of a JSON-lines file that does not parse; None when all do (or the
    file is one JSON document, which `datasets` also reads)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except ValueError as error:
                return number, str(error)
    return None


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
