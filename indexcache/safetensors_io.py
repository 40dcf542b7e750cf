"""safetensors files read and written at the byte level, without torch.

The export must keep every untouched tensor byte-identical and must not hold a multi-GB shard in memory, so shards
are handled here straight from the format (8-byte little-endian header length, JSON header, raw data): tensors are
copied as byte ranges, never decoded, from a source shard or from the export's spool of trained values, and hashed
as they pass. Keeping torch out also lets the validator run on machines without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

INDEX_FILE = "model.safetensors.index.json"  # the hub's shard index (weight_map: tensor name -> shard file)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtypes the project reads into torch and writes back
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
_COPY_CHUNK = 64 * 1024 * 1024
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class SafetensorsFormatError(ValueError):
    """A file that is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor's bytes live."""

    path: Path
    dtype: str  # safetensors dtype string ("BF16", "F32", ...)
    shape: tuple[int, ...]
    start: int  # absolute offset of the first data byte in `path`
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str] | None


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header and check that the data section matches it (catches truncated files)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError(f"{path} is not a safetensors file: {size} bytes, shorter than the header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise SafetensorsFormatError(f"{path} is not a safetensors file: header length {header_len} is impossible")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"{path} has an unreadable safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path} has a safetensors header that is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_len
    try:
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        tensors = {
            name: TensorInfo(
                path,
                entry["dtype"],
                tuple(int(dim) for dim in entry["shape"]),
                data_start + entry["data_offsets"][0],
                entry["data_offsets"][1] - entry["data_offsets"][0],
            )
            for name, entry in entries
        }
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise SafetensorsFormatError(f"{path} has a malformed safetensors header entry: {err!r}") from err
    offset = data_start
    for name, info in tensors.items():
        if info.start != offset:
            raise SafetensorsFormatError(f"{path}: tensor {name} does not start where the previous one ends")
        if info.dtype in _ITEMSIZE and info.nbytes != _ITEMSIZE[info.dtype] * math.prod(info.shape):
            raise SafetensorsFormatError(f"{path}: tensor {name} has {info.nbytes} bytes, not {info.dtype}{info.shape}")
        offset += info.nbytes
    if offset != size:
        raise SafetensorsFormatError(
            f"{path} is {size} bytes but its header describes {offset}: the file is truncated or padded"
        )
    return ShardHeader(path, tensors, metadata)


def write_safetensors(
    path: Path, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None
) -> dict[str, str]:
    """Write a safetensors file, copying each tensor byte for byte from where its `TensorInfo` points, then fsync it.

    Tensors are laid out by descending element size (stable, so the given order holds within a size), as the
    safetensors library does: every tensor then starts aligned to its element size, which zero-copy loaders need.
    Returns each tensor's sha256 (hex) of the bytes written, computed as they pass, so recording checksums costs
    no second read.
    """
    order = sorted(tensors, key=lambda name: -_ITEMSIZE.get(tensors[name].dtype, 1))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        tensor = tensors[name]
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data section starts 8-byte aligned
    sources: dict[Path, BinaryIO] = {}
    digests: dict[str, str] = {}
    try:
        with open(path, "xb") as out:
            out.write(struct.pack("<Q", len(header_bytes)))
            out.write(header_bytes)
            for name in order:
                tensor = tensors[name]
                if tensor.path not in sources:
                    sources[tensor.path] = open(tensor.path, "rb")  # noqa: SIM115 (closed in finally)
                digest = hashlib.sha256()
                _copy_range(sources[tensor.path], tensor.start, tensor.nbytes, out, digest)
                digests[name] = digest.hexdigest()
            out.flush()
            os.fsync(out.fileno())
    finally:
        for source in sources.values():
            source.close()
    return digests


def tensor_sha256(info: TensorInfo) -> str:
    """sha256 (hex) of one stored tensor's raw bytes, read in chunks (shards can be many GB)."""
    digest = hashlib.sha256()
    with open(info.path, "rb") as f:
        f.seek(info.start)
        remaining = info.nbytes
        while remaining:
            chunk = f.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{info.path} ended {remaining} bytes early while reading a tensor")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _copy_range(source: BinaryIO, start: int, nbytes: int, out: BinaryIO, digest: hashlib._Hash) -> None:
    source.seek(start)
    remaining = nbytes
    while remaining:
        chunk = source.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise OSError(f"{source.name} ended {remaining} bytes early while copying a tensor")
        out.write(chunk)
        digest.update(chunk)
        remaining -= len(chunk)


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors float dtype string ("BF16" -> torch.bfloat16)."""
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"safetensors dtype {dtype} is not a float dtype the project handles: one of {FLOAT_DTYPES}")
    return table[dtype]
