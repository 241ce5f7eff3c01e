"""Read TensorFlow "tensor bundle" checkpoints (V2) into numpy, without TensorFlow.

A checkpoint `<prefix>` is:
  - `<prefix>.index`: an SSTable (LevelDB table format) from tensor name to a serialized
    `BundleEntryProto` (dtype, shape, shard id, offset, size, masked crc32c); the empty key
    holds the `BundleHeaderProto` (number of data shards, endianness).
  - `<prefix>.data-<i>-of-<n>`: the raw little-endian tensor bytes.
A folder's `checkpoint` file (a text proto) names the newest prefix.

Table blocks may be stored raw or snappy-compressed; every block and tensor carries a
masked CRC-32C, which is verified.
"""

import mmap
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_human_preferences.utils.errors import UserError

TABLE_MAGIC = 0xDB4775248B80FB57
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
           10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_BFLOAT16 = 14


class CheckpointError(UserError):
    """A checkpoint file is truncated, corrupt or of an unsupported kind."""


# ---------------------------------------------------------------------------- CRC-32C
def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()
_TABLE_LIST = _TABLE.tolist()
_CHUNK = 4096


def _zeros_operator(length: int) -> list[np.ndarray]:
    """Byte tables of the linear map 'feed `length` zero bytes' on the CRC register."""
    registers = np.array([b << (8 * k) for k in range(4) for b in range(256)], dtype=np.uint32)
    for _ in range(length):
        registers = _TABLE[registers & 0xFF] ^ (registers >> 8)
    return [registers[256 * k:256 * (k + 1)].tolist() for k in range(4)]


_ZEROS = _zeros_operator(_CHUNK)


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C (Castagnoli) of `data`; large inputs are processed 4 KiB chunks at a time in numpy.

    Each chunk's register contribution is computed in parallel (zero initial register); the
    chunks are then chained with the linear map of 'advance over 4096 zero bytes'.
    """
    data = memoryview(data).cast("B")
    n_chunks = len(data) // _CHUNK
    crc = 0xFFFFFFFF
    if n_chunks:
        chunks = np.frombuffer(data[:n_chunks * _CHUNK], dtype=np.uint8).reshape(n_chunks, _CHUNK)
        partial = np.zeros(n_chunks, dtype=np.uint32)
        for i in range(_CHUNK):
            partial = _TABLE[(partial ^ chunks[:, i]) & 0xFF] ^ (partial >> 8)
        t0, t1, t2, t3 = _ZEROS
        for value in partial.tolist():
            crc = t0[crc & 0xFF] ^ t1[(crc >> 8) & 0xFF] ^ t2[(crc >> 16) & 0xFF] ^ t3[crc >> 24] ^ value
    for byte in data[n_chunks * _CHUNK:]:
        crc = _TABLE_LIST[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------- varints, snappy
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def snappy_decompress(buf: bytes) -> bytes:
    """Decode a raw snappy block (literals and back-references)."""
    length, pos = _varint(buf, 0)
    out = bytearray()
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(buf[pos:pos + extra], "little")
                pos += extra
            size += 1
            out += buf[pos:pos + size]
            pos += size
            continue
        if kind == 1:
            size, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | buf[pos]
            pos += 1
        elif kind == 2:
            size, offset = (tag >> 2) + 1, int.from_bytes(buf[pos:pos + 2], "little")
            pos += 2
        else:
            size, offset = (tag >> 2) + 1, int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise CheckpointError("corrupt snappy block (bad back-reference)")
        for _ in range(size):  # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != length:
        raise CheckpointError("corrupt snappy block (wrong decoded length)")
    return bytes(out)


# ---------------------------------------------------------------------------- SSTable
def _read_block(file: bytes, offset: int, size: int, name: str) -> bytes:
    if offset + size + 5 > len(file):
        raise CheckpointError(f"{name} is truncated (a table block runs past the end of the file)")
    block, kind = file[offset:offset + size], file[offset + size]
    (masked,) = struct.unpack("<I", file[offset + size + 1:offset + size + 5])
    if crc32c(file[offset:offset + size + 1]) != unmask_crc(masked):
        raise CheckpointError(f"{name} is corrupt (a table block fails its CRC-32C check)")
    if kind == 0:
        return block
    if kind == 1:
        return snappy_decompress(block)
    raise CheckpointError(f"{name} uses block compression type {kind}; only raw and snappy are supported")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    (n_restarts,) = struct.unpack("<I", block[-4:])
    end = len(block) - 4 - 4 * n_restarts
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def read_table(path: Path) -> dict[bytes, bytes]:
    """All key/value pairs of an SSTable file."""
    file = path.read_bytes()
    name = path.name
    if len(file) < 48:
        raise CheckpointError(f"{name} is truncated (shorter than a table footer)")
    footer = file[-48:]
    (magic,) = struct.unpack("<Q", footer[-8:])
    if magic != TABLE_MAGIC:
        raise CheckpointError(f"{name} is not a TensorFlow checkpoint index (bad magic number); "
                              "it may be truncated or another kind of file")
    _, pos = _varint(footer, 0)  # metaindex handle (unused)
    _, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    table = {}
    for _, handle in _block_entries(_read_block(file, index_offset, index_size, name)):
        offset, pos = _varint(handle, 0)
        size, _ = _varint(handle, pos)
        table.update(_block_entries(_read_block(file, offset, size, name)))
    return table


# ---------------------------------------------------------------------------- protos
def _proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a protobuf message: ints for varint/fixed, bytes for nested."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            (value,) = struct.unpack("<Q", buf[pos:pos + 8])
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value = buf[pos:pos + size]
            pos += size
        elif wire == 5:
            (value,) = struct.unpack("<I", buf[pos:pos + 4])
            pos += 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        fields.append((number, value))
    return fields


@dataclass
class Entry:
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc: int | None


def _parse_entry(buf: bytes) -> Entry:
    entry = Entry(dtype=0, shape=(), shard=0, offset=0, size=0, crc=None)
    for number, value in _proto_fields(buf):
        if number == 1:
            entry.dtype = value
        elif number == 2:
            dims = [v for n, v in _proto_fields(value) if n == 2]
            entry.shape = tuple(next((s for n, s in _proto_fields(d) if n == 1), 0) for d in dims)
        elif number == 3:
            entry.shard = value
        elif number == 4:
            entry.offset = value
        elif number == 5:
            entry.size = value
        elif number == 6:
            entry.crc = value
        elif number == 7:
            raise CheckpointError("partitioned (sliced) variables are not supported")
    return entry


# ---------------------------------------------------------------------------- checkpoints
def latest_prefix(checkpoint_file: Path) -> str:
    """The `model_checkpoint_path` of a `checkpoint` file, as a name relative to its folder."""
    match = re.search(r'^model_checkpoint_path:\s*"(.*)"', checkpoint_file.read_text(), re.MULTILINE)
    if not match:
        raise CheckpointError(f"{checkpoint_file} names no model_checkpoint_path")
    return match.group(1).replace("\\", "/").rsplit("/", 1)[-1]  # the original may hold an absolute path


def read_index(index_path: Path) -> tuple[int, dict[str, Entry]]:
    """(number of data shards, tensor name → entry) of a checkpoint's `.index` file."""
    table = read_table(index_path)
    header = _proto_fields(table.pop(b"", b""))
    if next((v for n, v in header if n == 2), 0) != 0:
        raise CheckpointError(f"{index_path.name}: big-endian checkpoints are not supported")
    num_shards = next((v for n, v in header if n == 1), 1)
    return num_shards, {key.decode(): _parse_entry(value) for key, value in table.items()}


def read_tensors(entries: dict[str, Entry], num_shards: int,
                 fetch_shard: Callable[[int, int], Path]) -> dict[str, np.ndarray]:
    """The tensors of `entries`; `fetch_shard(i, n)` gives the local path of data shard i of n.

    Shards are memory-mapped, so a multi-GB checkpoint is not read into memory twice.
    """
    shards: dict[int, mmap.mmap | bytes] = {}
    tensors = {}
    try:
        for name, entry in entries.items():
            if entry.shard not in shards:
                path = fetch_shard(entry.shard, num_shards)
                with open(path, "rb") as f:  # an empty file cannot be memory-mapped
                    shards[entry.shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
            data = shards[entry.shard]
            if entry.offset + entry.size > len(data):
                raise CheckpointError(f"{name}: the data shard is truncated (needs bytes up to "
                                      f"{entry.offset + entry.size}, has {len(data)}); download it again")
            with memoryview(data)[entry.offset:entry.offset + entry.size] as raw:
                if entry.crc is not None and crc32c(raw) != unmask_crc(entry.crc):
                    raise CheckpointError(f"{name}: the data fails its CRC-32C check; the checkpoint is corrupt")
                tensors[name] = _decode(name, entry, raw)
    finally:
        for shard in shards.values():
            if isinstance(shard, mmap.mmap):
                shard.close()
    return tensors


def _decode(name: str, entry: Entry, raw: memoryview) -> np.ndarray:
    if entry.dtype == _BFLOAT16:
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif entry.dtype in _DTYPES:
        array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[entry.dtype]).newbyteorder("<"))
    else:
        raise CheckpointError(f"{name}: unsupported tensor dtype {entry.dtype}")
    if array.size != int(np.prod(entry.shape, dtype=np.int64)):
        raise CheckpointError(f"{name}: {array.size} values for shape {list(entry.shape)}; the checkpoint is corrupt")
    return array.reshape(entry.shape).copy()
