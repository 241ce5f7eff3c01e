"""Whether a downloaded file is whole, by its format, for bodies sent without Content-Length.

A truncated .json does not parse, a truncated .gz lacks its trailer, a truncated .safetensors has
tensors reaching past its end, and a truncated TensorFlow table (.index) lacks its footer's magic
number. Other types have no such check and are accepted as they come.
"""

import gzip
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

_CHUNK = 1 << 20
# The last 8 bytes of a TensorFlow table (.index) file. Same value as
# language.tf_checkpoint.TABLE_MAGIC, repeated because utils never imports from the rest of
# the package (the language modules import utils).
_TF_TABLE_MAGIC = 0xDB4775248B80FB57


def _json_complete(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except ValueError:
        return False
    return True


def _gzip_complete(path: Path) -> bool:
    """Whether the file decompresses to the end (a truncated one lacks the gzip trailer)."""
    try:
        with gzip.open(path) as stream:
            while stream.read(_CHUNK):
                pass
    except (EOFError, OSError, zlib.error):
        return False
    return True


def _safetensors_complete(path: Path) -> bool:
    """Whether the header fits the file and every tensor's data lies within it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return False
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            return False
        try:
            header = json.loads(f.read(header_size))
        except ValueError:
            return False
    data_size = size - 8 - header_size
    if not isinstance(header, dict):
        return False
    tensors = [info for name, info in header.items() if name != "__metadata__"]
    return all(_offsets_within(info, data_size) for info in tensors)


def _offsets_within(info: object, data_size: int) -> bool:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    return (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size)


def _tf_index_complete(path: Path) -> bool:
    """Whether the file ends with a table footer's magic number."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) < 48:  # shorter than a table footer
            return False
        f.seek(-8, os.SEEK_END)
        return struct.unpack("<Q", f.read(8))[0] == _TF_TABLE_MAGIC


# By file suffix.
_COMPLETENESS_CHECKS: dict[str, Callable[[Path], bool]] = {
    ".json": _json_complete,
    ".gz": _gzip_complete,
    ".safetensors": _safetensors_complete,
    ".index": _tf_index_complete,
}


def is_complete(path: Path, suffix: str) -> bool:
    """Whether `path` is a whole file of the type `suffix` names (True for types without a check)."""
    check = _COMPLETENESS_CHECKS.get(suffix)
    return check is None or check(path)
