"""Documents -> token windows: tokenised with the model's tokenizer (EOS after every document), concatenated and
cut into full `seq_len` windows (no padding, the remainder dropped), within each split's token cap.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from indexcache.data_sources import DataConfig

# Tokenising a capped corpus grows the tokenised prefix geometrically from this many documents, so a small
# `max_tokens` never pays for tokenising a large corpus.
_FIRST_PREFIX_DOCS = 64

logger = logging.getLogger(__name__)


def split_token_caps(max_tokens: int | None, validation_fraction: float) -> dict[str, int | None]:
    # Each split gets its share of the cap, so a small cap still leaves a validation set.
    if max_tokens is None:
        return {"train": None, "validation": None}
    validation = round(max_tokens * validation_fraction)
    return {"train": max_tokens - validation, "validation": validation}


def split_by_tokens(
    streams: dict[str, np.ndarray], validation_fraction: float, seq_len: int, num_documents: dict[str, int]
) -> dict[str, np.ndarray]:
    """Hold out the last `validation_fraction` of the tokens (whole windows, at least one) when the split by
    document leaves a split without one window: a corpus of one file, or of a few, has too few documents for the
    hash to split. Only then may a document straddle the split. Unchanged when the text is too short for two windows.
    """
    whole = np.concatenate([streams["train"], streams["validation"]])
    held = max(1, math.ceil(whole.size * validation_fraction / seq_len)) * seq_len
    if whole.size - held < seq_len:
        return streams  # too short for a window on each side: require_windows says so
    short = min(streams, key=lambda split: streams[split].size)
    logger.warning(
        "indexcache: data: the split by document left the %s split %d tokens (%d of %d documents), less than one "
        "seq_len=%d window: its last %d tokens are held out for validation instead",
        short,
        streams[short].size,
        num_documents[short],
        sum(num_documents.values()),
        seq_len,
        held,
    )
    return {"train": whole[:-held], "validation": whole[-held:]}


def require_windows(
    split: str, windows: datasets.Dataset, num_tokens: int, num_docs: int, seq_len: int, cfg: DataConfig
) -> None:
    if len(windows) > 0 or (split == "validation" and cfg.validation_fraction == 0.0):
        return
    raise ValueError(
        f"the {split} split has {num_tokens} tokens from {num_docs} documents, less than one seq_len={seq_len} "
        "window: add text, raise data.max_tokens / data.max_files / data.validation_fraction, or lower seq_len"
    )


# ---- tokenising and packing ---------------------------------------------------------------------------------


class Tokenize:
    """Batched map function: token ids of each document followed by EOS; empty documents vanish."""

    def __init__(self, tokenizer: Any, eos_id: int) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id

    def __call__(self, batch: dict[str, list[str | None]]) -> dict[str, list[list[int]]]:
        texts = [text or "" for text in batch["text"]]
        # verbose=False: long documents are expected here (they are packed later), so no length warnings.
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)
        pairs = zip(encoded["input_ids"], texts, strict=True)
        return {"input_ids": [[*ids, self.eos_id] if text else [] for ids, text in pairs]}


def tokenize_documents(
    pieces: list[datasets.Dataset], tokenize: Tokenize, cap: int | None, num_proc: int
) -> np.ndarray:
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


def pack_windows(stream: np.ndarray, seq_len: int) -> datasets.Dataset:
    num_windows = stream.size // seq_len
    values = pa.array(np.ascontiguousarray(stream[: num_windows * seq_len], dtype=np.int32))
    windows = pa.FixedSizeListArray.from_arrays(values, seq_len)
    return datasets.Dataset(pa.table({"input_ids": windows}))
