"""Data pipeline on real text (Python's stdlib sources) with a real BPE tokenizer trained offline on that text."""

from __future__ import annotations

import json
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from indexcache.batches import ResumableBatches, collate_padded
from indexcache.data import build_datasets
from indexcache.data_sources import DataConfig, document_split, source_files

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, pure-ASCII/UTF-8 stdlib modules: enough text for a few hundred 64-token windows, tokenised in well under 1 s.
CORPUS_FILES = [
    "bisect.py",
    "colorsys.py",
    "copy.py",
    "fnmatch.py",
    "glob.py",
    "heapq.py",
    "keyword.py",
    "queue.py",
    "sched.py",
    "shlex.py",
    "stat.py",
    "textwrap.py",
]
SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE (vocab 512) trained on stdlib text, saved as a PreTrainedTokenizerFast and reloaded."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(STDLIB / name) for name in CORPUS_FILES], trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def make_corpus(root: Path, names: list[str]) -> Path:
    """Copy stdlib files into `root` (half in a subfolder) in the given order, plus files that must be skipped."""
    for name in names:
        target = root / ("pkg" if CORPUS_FILES.index(name) % 2 else "") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / name, target)
    (root / "empty.py").write_text("")  # an empty document must vanish, not leave a lone EOS
    (root / ".hidden.py").write_text("hidden = True\n")  # hidden files are tooling state, not corpus
    (root / "notes.bin").write_text("not an allowed extension\n")
    return root


def stream_of(tokenizer, texts: list[str]) -> list[int]:
    """The reference token stream: each non-empty document's ids followed by EOS."""
    stream: list[int] = []
    for text in texts:
        if text:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


def flat(windows: datasets.Dataset) -> list[int]:
    return [token for row in windows["input_ids"] for token in row]


def corpus_documents(root: Path) -> list[tuple[str, str]]:
    """(relative key, text) of every corpus document in sorted path order, as the pipeline must read them."""
    paths = sorted(p for p in root.resolve().rglob("*.py") if not p.name.startswith("."))
    return [(p.relative_to(root.resolve()).as_posix(), p.read_text(encoding="utf-8")) for p in paths]


def assert_packed(windows: datasets.Dataset, expected_stream: list[int]) -> None:
    """Only full windows, and together they are exactly the stream with the sub-window remainder dropped."""
    assert all(len(row) == SEQ_LEN for row in windows["input_ids"])
    assert len(windows) == len(expected_stream) // SEQ_LEN
    assert flat(windows) == expected_stream[: len(windows) * SEQ_LEN]


# ---- build_datasets -----------------------------------------------------------------------------------------


def test_packing_gives_full_windows_equal_to_the_tokenised_text(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", CORPUS_FILES)
    cfg = DataConfig(sources=[str(corpus)], validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    splits = build_datasets(cfg, tokenizer, SEQ_LEN)

    documents = corpus_documents(corpus)
    assert [Path(p).name for p in source_files(cfg)] == [Path(key).name for key, _ in documents]
    assert_packed(splits.train, stream_of(tokenizer, [text for _, text in documents]))
    assert len(splits.validation) == 0
    assert splits.num_documents == {"train": len(CORPUS_FILES) + 1, "validation": 0}  # + empty.py


def test_split_is_by_document_seeded_and_disjoint(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", CORPUS_FILES)
    documents = corpus_documents(corpus)
    assignments = {}
    for seed in (0, 1):
        cfg = DataConfig(sources=[str(corpus)], validation_fraction=0.3, seed=seed, cache_dir=str(tmp_path / "cache"))
        splits = build_datasets(cfg, tokenizer, SEQ_LEN)
        assignment = {key: document_split(key, seed, 0.3) for key, _ in documents}
        # Each split is exactly its own documents' stream: no window mixes text from both splits.
        for name, windows in (("train", splits.train), ("validation", splits.validation)):
            texts = [text for key, text in documents if assignment[key] == name]
            assert_packed(windows, stream_of(tokenizer, texts))
            assert len(windows) > 0
        assignments[seed] = assignment
    assert assignments[0] != assignments[1], "the split must depend on data.seed"
    assert document_split("a.py", 0, 0.3) == document_split("a.py", 0, 0.3)


def test_order_is_identical_across_builds_and_filesystem_orders(tmp_path, tokenizer):
    forward = make_corpus(tmp_path / "forward", CORPUS_FILES)
    backward = make_corpus(tmp_path / "backward", CORPUS_FILES[::-1])
    results = []
    # The third build is served from the datasets cache; the glob is keyed relative to its folder part.
    for source in (forward, backward, forward, f"{forward}/**/*.py"):
        cfg = DataConfig(sources=[str(source)], validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
        splits = build_datasets(cfg, tokenizer, SEQ_LEN)
        results.append((flat(splits.train), flat(splits.validation)))
    # Keys are relative to the source folder, so a copy created in another order splits and packs the same.
    assert results[0] == results[1] == results[2] == results[3]


def test_parallel_tokenisation_gives_the_same_windows(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", CORPUS_FILES)
    results = []
    for num_proc in (1, 2):
        cfg = DataConfig(
            sources=[str(corpus)],
            validation_fraction=0.3,
            num_proc=num_proc,
            cache_dir=str(tmp_path / f"cache_{num_proc}"),  # separate caches: the second build must recompute
        )
        splits = build_datasets(cfg, tokenizer, SEQ_LEN)
        results.append((flat(splits.train), flat(splits.validation)))
    assert results[0] == results[1]


def test_caps_take_the_first_files_and_share_tokens_between_splits(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", CORPUS_FILES)
    cache = str(tmp_path / "cache")
    capped_files = DataConfig(sources=[str(corpus)], max_files=3, validation_fraction=0.0, cache_dir=cache)
    assert source_files(capped_files) == source_files(DataConfig(sources=[str(corpus)]))[:3]
    texts = [Path(p).read_text(encoding="utf-8") for p in source_files(capped_files)]
    assert_packed(build_datasets(capped_files, tokenizer, SEQ_LEN).train, stream_of(tokenizer, texts))

    capped_tokens = DataConfig(sources=[str(corpus)], max_tokens=3000, validation_fraction=0.25, cache_dir=cache)
    splits = build_datasets(capped_tokens, tokenizer, SEQ_LEN)
    assert len(splits.train) == 2250 // SEQ_LEN and len(splits.validation) == 750 // SEQ_LEN


def test_token_cap_beyond_the_first_tokenised_prefix_keeps_document_order(tmp_path, tokenizer):
    # Hundreds of short rows: a cap near the total forces the tokenised prefix to grow past its first 64 documents.
    rows = [chunk for name in CORPUS_FILES for chunk in (STDLIB / name).read_text().split("\n\n") if chunk.strip()]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    train_rows = [r for r in rows if document_split(r, 0, 0.25) == "train"]
    validation_rows = [r for r in rows if document_split(r, 0, 0.25) == "validation"]
    full = {"train": stream_of(tokenizer, train_rows), "validation": stream_of(tokenizer, validation_rows)}
    assert len(rows) > 300
    max_tokens = int(0.8 * (len(full["train"]) + len(full["validation"])))
    cfg = DataConfig(
        sources=[str(path)], max_tokens=max_tokens, validation_fraction=0.25, cache_dir=str(tmp_path / "cache")
    )
    splits = build_datasets(cfg, tokenizer, SEQ_LEN)
    caps = {"validation": round(max_tokens * 0.25), "train": max_tokens - round(max_tokens * 0.25)}
    for name, windows in (("train", splits.train), ("validation", splits.validation)):
        assert_packed(windows, full[name][: caps[name]])


def test_stdlib_source_reads_the_standard_library_only(tmp_path, tokenizer):
    cfg = DataConfig(sources=["stdlib"], max_files=4, validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    files = source_files(cfg)
    everything = source_files(DataConfig(sources=["stdlib"]))
    assert len(everything) > 500 and all(p.endswith(".py") for p in everything)
    third_party = {"site-packages", "dist-packages"}
    assert not any(third_party & set(Path(p).parts) for p in everything), "installed packages are not the stdlib"
    assert files == sorted(everything)[:4]
    texts = [Path(p).read_text(encoding="utf-8") for p in files]
    assert_packed(build_datasets(cfg, tokenizer, SEQ_LEN).train, stream_of(tokenizer, texts))


def rows_from_stdlib(count: int) -> list[str]:
    """Real text rows: top-level chunks of stdlib modules (blank-line separated), plus one duplicate and one empty."""
    rows = []
    for name in CORPUS_FILES:
        rows += [chunk for chunk in (STDLIB / name).read_text(encoding="utf-8").split("\n\n\n") if chunk.strip()]
    rows = rows[:count]
    return [*rows, rows[0], ""]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved"])
def test_row_inputs_split_by_content(tmp_path, tokenizer, kind):
    rows = rows_from_stdlib(60)
    table = {"content": rows, "id": list(range(len(rows)))}
    cfg = DataConfig(text_field="content", validation_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps({"content": r, "id": i}) + "\n" for i, r in enumerate(rows)))
        cfg.sources = [str(path)]
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        pq.write_table(pa.table(table), path)
        cfg.sources = [str(path)]
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(tmp_path / "saved")
        cfg.sources, cfg.saved_dataset = [], str(tmp_path / "saved")
    splits = build_datasets(cfg, tokenizer, SEQ_LEN)
    for name, windows in (("train", splits.train), ("validation", splits.validation)):
        # The duplicate row follows its original: identical rows can never sit on both sides of the split.
        assert_packed(windows, stream_of(tokenizer, [r for r in rows if document_split(r, 0, 0.3) == name]))
        assert len(windows) > 0
    assert sum(splits.num_documents.values()) == len(rows)


def test_mixed_folder_reads_text_then_jsonl_then_parquet(tmp_path, tokenizer):
    rows = rows_from_stdlib(20)
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"text": rows[10:20]}), folder / "a.parquet")  # sorts first, read last
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:10]))
    (folder / "c.txt").write_text(rows[0])
    cfg = DataConfig(sources=[str(folder)], validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    assert_packed(build_datasets(cfg, tokenizer, SEQ_LEN).train, stream_of(tokenizer, [rows[0], *rows[:20]]))


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Callable[[], DataConfig], list[str]]]:
    """name -> (config factory, substrings the one-line message must contain): a config may fail as it is built."""
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "blob.bin").write_text("x")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.md").write_text("")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "some text"}) + "\n")
    missing = str(tmp_path / "no_such_dir")
    cache = str(tmp_path / "cache")
    return {
        "missing_path": (lambda: DataConfig(sources=[missing], cache_dir=cache), [missing, "does not exist"]),
        "no_matching_files": (
            lambda: DataConfig(sources=[str(tmp_path / "binaries")], cache_dir=cache),
            [str(tmp_path / "binaries"), "data.extensions"],
        ),
        "empty_glob": (
            lambda: DataConfig(sources=[str(tmp_path / "*.md")], cache_dir=cache),
            ["*.md", "matched no files"],
        ),
        "only_empty_text": (
            lambda: DataConfig(sources=[str(tmp_path / "blank")], cache_dir=cache),
            [str(tmp_path / "blank"), "empty"],
        ),
        "missing_text_field": (
            lambda: DataConfig(sources=[str(tmp_path / "rows.jsonl")], cache_dir=cache),
            ["rows.jsonl", "'text'", "data.text_field"],
        ),
        "missing_saved_dataset": (lambda: DataConfig(sources=[], saved_dataset=missing), [missing, "save_to_disk"]),
        "not_a_saved_dataset": (
            lambda: DataConfig(sources=[], saved_dataset=str(tmp_path / "blank")),
            [str(tmp_path / "blank"), "save_to_disk"],
        ),
        "saved_and_sources": (lambda: DataConfig(saved_dataset=missing), ["data.sources=[]"]),
        "too_little_text": (
            lambda: DataConfig(sources=[str(STDLIB / "keyword.py")], validation_fraction=0.0, cache_dir=cache),
            ["seq_len=100000", "window"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing_path",
        "no_matching_files",
        "empty_glob",
        "only_empty_text",
        "missing_text_field",
        "missing_saved_dataset",
        "not_a_saved_dataset",
        "saved_and_sources",
        "too_little_text",
    ],
)
def test_bad_inputs_fail_with_one_line(tmp_path, tokenizer, case):
    make_cfg, fragments = bad_inputs(tmp_path)[case]
    seq_len = 100_000 if case == "too_little_text" else SEQ_LEN
    with pytest.raises(ValueError) as error:
        build_datasets(make_cfg(), tokenizer, seq_len)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ---- ResumableBatches -----------------------------------------------------------------------------------------


def indexed_windows(count: int, width: int = 4) -> datasets.Dataset:
    """Window i is [i, i, ...]: a batch tells which windows it holds."""
    return datasets.Dataset.from_dict({"input_ids": [[i] * width for i in range(count)]})


def take(iterator, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(iterator) for _ in range(count)]


def test_resumed_iterator_yields_exactly_the_uninterrupted_batches(tmp_path, tokenizer):
    corpus = make_corpus(tmp_path / "corpus", CORPUS_FILES[:4])
    cfg = DataConfig(sources=[str(corpus)], validation_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    windows = build_datasets(cfg, tokenizer, SEQ_LEN).train
    per_epoch = ResumableBatches(windows, batch_size=3, seed=7).batches_per_epoch
    reference = take(iter(ResumableBatches(windows, batch_size=3, seed=7)), 2 * per_epoch + 5)

    # Stop points inside the first epoch, exactly at its end, and in the second; the resumed run crosses a boundary.
    for consumed in (0, 1, per_epoch - 1, per_epoch, per_epoch + 2):
        interrupted = ResumableBatches(windows, batch_size=3, seed=7)
        take(iter(interrupted), consumed)
        state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
        resumed = ResumableBatches(windows, batch_size=3, seed=7)
        resumed.load_state_dict(state)
        continued = take(iter(resumed), per_epoch + 2)
        for got, want in zip(continued, reference[consumed:], strict=False):
            assert torch.equal(got["input_ids"], want["input_ids"])
    assert not torch.equal(reference[0]["input_ids"], reference[per_epoch]["input_ids"]), "epochs reshuffle"


def test_packed_batches_are_long_and_carry_no_attention_mask(tmp_path):
    batch = next(iter(ResumableBatches(indexed_windows(10), batch_size=4, seed=0)))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (4, 4)
    # An all-ones mask would make every layer build a [B, 1, T, T] mask and leave the flash kernel.
    assert "attention_mask" not in batch


@pytest.mark.parametrize("count", [24, 26])
def test_ranks_partition_each_epoch(count):
    world_size, batch_size = 3, 2
    loaders = [
        ResumableBatches(indexed_windows(count), batch_size, seed=3, rank=r, world_size=world_size) for r in range(3)
    ]
    per_epoch = loaders[0].batches_per_epoch
    assert per_epoch == (count // world_size) // batch_size
    iterators = [iter(loader) for loader in loaders]
    epochs = []
    for _ in range(2):
        seen = [torch.cat([b["input_ids"][:, 0] for b in take(it, per_epoch)]).tolist() for it in iterators]
        union = [i for rank_seen in seen for i in rank_seen]
        assert len(union) == len(set(union)) == per_epoch * batch_size * world_size  # disjoint, equal shares
        assert set(union) <= set(range(count))
        epochs.append(seen)
    assert epochs[0] != epochs[1]


def test_drop_last_false_keeps_the_partial_batch_and_small_data_fails():
    loader = ResumableBatches(indexed_windows(10), batch_size=4, seed=0, drop_last=False)
    sizes = [len(b["input_ids"]) for b in take(iter(loader), 3)]
    assert sizes == [4, 4, 2]
    with pytest.raises(ValueError, match="no full batch"):
        ResumableBatches(indexed_windows(3), batch_size=4, seed=0)
    with pytest.raises(ValueError, match="changed since the checkpoint"):
        loader.load_state_dict({"epoch": 0, "position": 99})


def test_collate_padded_pads_right_and_masks_padding():
    batch = collate_padded([[5, 6, 7], [8], []], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
