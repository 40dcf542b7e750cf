"""Text sources -> tokenised, packed, document-split datasets: `build_datasets`, and the batches over them.

Pipeline: enumerate files (sorted, so filesystem order never matters) -> load documents with HF `datasets`
(a text file is one document, a jsonl/parquet/saved-dataset row is one document) -> assign each document to
train or validation by a seeded hash (so no document, and hence no window, straddles the split) -> tokenise with
the model's tokenizer, EOS after every document -> concatenate and cut into full `seq_len` windows (no padding,
the remainder is dropped). A corpus of too few documents for the hash to give both splits a window (one file, at
the default validation_fraction) is split by tokens instead: its last validation_fraction is held out, with a
warning, and only then may a document straddle the split.

The stages live in their own modules: data_sources.py (`DataConfig`, files, documents, the split), packing.py
(tokenising, windows) and batches.py (`ResumableBatches`, which serves windows in an epoch-seeded order and resumes
exactly from its `{epoch, position}` state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from indexcache.batches import ResumableBatches, collate_padded
from indexcache.data_sources import DataConfig, load_documents
from indexcache.packing import (
    Tokenize,
    pack_windows,
    require_windows,
    split_by_tokens,
    split_token_caps,
    tokenize_documents,
)

# The batches are served from here too: the trainer reads `indexcache.data.ResumableBatches`.
__all__ = ["DataConfig", "PackedSplits", "ResumableBatches", "build_datasets", "collate_padded"]


@dataclass
class PackedSplits:
    """Both splits hold one column `input_ids` of exactly `seq_len` int32 token ids per row."""

    train: datasets.Dataset
    validation: datasets.Dataset
    seq_len: int
    num_documents: dict[str, int]  # documents assigned to each split (before any max_tokens cap)


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
    for documents, assignment in load_documents(cfg):
        for split in by_split:
            rows = [row for row, assigned in enumerate(assignment) if assigned == split]
            if rows:
                by_split[split].append(documents.select(rows))

    caps = split_token_caps(cfg.max_tokens, cfg.validation_fraction)
    tokenize = Tokenize(tokenizer, eos_id)
    num_documents = {split: sum(len(piece) for piece in pieces) for split, pieces in by_split.items()}
    streams = {
        split: tokenize_documents(pieces, tokenize, caps[split], cfg.num_proc)[: caps[split]]
        for split, pieces in by_split.items()
    }
    if all(stream.size == 0 for stream in streams.values()):
        where = f"data.saved_dataset={cfg.saved_dataset}" if cfg.saved_dataset else f"data.sources={list(cfg.sources)}"
        raise ValueError(f"no text in {where}: every document is empty; point it at files or rows with text")
    if cfg.validation_fraction > 0 and min(stream.size for stream in streams.values()) < seq_len:
        streams = split_by_tokens(streams, cfg.validation_fraction, seq_len, num_documents)
    windows = {}
    for split, stream in streams.items():
        windows[split] = pack_windows(stream, seq_len)
        require_windows(split, windows[split], stream.size, num_documents[split], seq_len, cfg)
    return PackedSplits(windows["train"], windows["validation"], seq_len, num_documents)
