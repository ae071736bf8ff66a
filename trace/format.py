"""The trace file format, version 1: framing, block kinds, call records (see docs/trace-format.md).

A trace is a 16-byte file header followed by *blocks*, appended and never
rewritten. Each block carries its own length and two CRC32s (of its header and
of its body), so a reader can tell the torn end of a file that was being
written when its process died (dropped, with a warning) from damage in the
middle (a `TraceCorruptError` naming the byte offset).

This module holds the byte layout only: encoding and decoding of blocks and
records, no policy about when to write them (`recorder.py`) or what they mean
(`reader.py`).
"""
from __future__ import annotations

import struct
import zlib
from typing import Any, BinaryIO, Callable, Iterator

import msgpack
import zstandard

from harp import api
from harp.errors import HarpError

#: First 8 bytes of every trace (PNG-style: a high byte, a name, line-ending traps).
MAGIC = b"\x89HTR\r\n\x1a\n"
#: The format version this module writes; a reader accepts the same major version.
VERSION_MAJOR = 1
VERSION_MINOR = 0
FILE_HEADER = struct.Struct("<8sHHI")            # magic, major, minor, reserved (0)
FILE_HEADER_SIZE = FILE_HEADER.size              # 16

#: Block header: sync mark, kind, codec, body length, body CRC32, header CRC32 (of bytes 0..11).
BLOCK_HEADER = struct.Struct("<2sBBIII")
BLOCK_HEADER_SIZE = BLOCK_HEADER.size            # 16
BLOCK_SYNC = b"HB"
#: The largest body a reader accepts (a writer keeps blocks far smaller).
MAX_BODY = 256 << 20

# Block kinds.
HEADER, CALLS, BLOB, END = 1, 2, 3, 4
BLOCK_NAMES = {HEADER: "header", CALLS: "calls", BLOB: "blob", END: "end"}
# Codecs of a block body (for BLOB: of the part after its 16-byte prefix).
RAW, ZSTD = 0, 1
#: BLOB bodies start with (blob id, byte offset of this part in the blob).
BLOB_PREFIX = struct.Struct("<QQ")
#: A blob is stored in parts of at most this many raw bytes.
BLOB_PART = 16 << 20
#: Bodies smaller than this are stored raw: compressing them costs more than it saves.
COMPRESS_MIN = 256

# Call ops: the number in a record's first field, from the API table (`harp.api`: each
# call's `trace_op`, fixed for format version 1), and the record's own fields.
_TRACE_OP = {c.name: c.trace_op for c in api.CALLS if c.trace_op}
ALLOC, FREE, WRITE, READ = (_TRACE_OP[n] for n in ("alloc", "free", "write", "read"))
COPY, FILL, LOAD_MODULE, FUNCTION = (_TRACE_OP[n] for n in ("copy", "fill", "load_module",
                                                            "function"))
LAUNCH, STREAM, EVENT, RECORD, WAIT = (_TRACE_OP[n] for n in ("launch", "stream", "event",
                                                              "record", "wait"))
SYNCHRONIZE, ELAPSED, MEM_INFO, CLOSE = (_TRACE_OP[n] for n in ("synchronize", "elapsed",
                                                                "mem_info", "close"))

#: API name -> the names of the fields after [op, seq, t0, t1, error] (the trace's own:
#: what a replay and a report need, e.g. a buffer's size and a read's digest).
FIELDS: dict[str, tuple[str, ...]] = {
    "alloc": ("nbytes", "buffer"),
    "free": ("buffer", "buffer_nbytes"),
    "write": ("buffer", "buffer_nbytes", "offset", "nbytes", "stream", "blob"),
    "read": ("buffer", "buffer_nbytes", "offset", "nbytes", "stream", "digest"),
    "copy": ("dst", "dst_nbytes", "dst_offset", "src", "src_nbytes", "src_offset", "nbytes",
             "stream"),
    "fill": ("buffer", "buffer_nbytes", "value", "offset", "nbytes", "stream"),
    "load_module": ("format", "blob", "is_str", "module"),
    "function": ("module", "name", "function"),
    "launch": ("function", "grid", "block", "shared_mem", "stream", "args"),
    "stream": ("stream_id",),
    "event": ("event",),
    "record": ("event", "stream"),
    "wait": ("stream", "event"),
    "synchronize": ("stream",),
    "elapsed": ("start", "end", "ms"),
    "mem_info": ("free", "total"),
    "close": (),
}

#: op -> (API name, field names); one entry per call of the API table.
OPS: dict[int, tuple[str, tuple[str, ...]]] = {_TRACE_OP[name]: (name, FIELDS[name])
                                               for name in api.NAMES}
API_NAMES = {op: spec[0] for op, spec in OPS.items()}
OPS_BY_NAME = {spec[0]: op for op, spec in OPS.items()}
SYNC_OPS = frozenset(_TRACE_OP[name] for name in api.SYNC_NAMES)
#: Index of the first op-specific field in a record.
FIELDS_AT = 5

# Kernel argument tags in a LAUNCH record's args.
ARG_BUFFER, ARG_SCALAR, ARG_ARRAY = 0, 1, 2
#: A value the recorder could not encode (only in calls that failed at once) is a map
#: {UNRECORDABLE: repr(value)}.
UNRECORDABLE = "unrecordable"

#: Digest of read data: BLAKE2b with a 16-byte digest.
READ_DIGEST = "blake2b-128"


class TraceError(HarpError):
    """A trace file cannot be read: not a trace, an unknown version, or damaged."""
    code = "TRACE"


class TraceCorruptError(TraceError):
    """A block in the middle of a trace is damaged; `offset` is the byte where it starts."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"corrupt trace {path} at byte offset {offset}: {reason}")
        self.path, self.offset, self.reason = path, offset, reason


class TraceTruncatedWarning(UserWarning):
    """A trace ends in an incomplete block (its writer died mid-write); the rest is readable."""


class TraceIncompleteWarning(UserWarning):
    """A trace has no end block: its writer stopped without closing it, or is still writing."""


# -- writing ---------------------------------------------------------------------

def file_header() -> bytes:
    return FILE_HEADER.pack(MAGIC, VERSION_MAJOR, VERSION_MINOR, 0)


def block(kind: int, body: bytes | memoryview, codec: int = RAW) -> bytes:
    """One framed block: header with length and CRCs, then `body` as given."""
    head = struct.pack("<2sBBII", BLOCK_SYNC, kind, codec, len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + bytes(body)


class Encoder:
    """Encodes blocks: msgpack for structure, zstandard for bodies worth compressing."""

    def __init__(self, level: int = 1, default: Callable[[Any], Any] | None = None) -> None:
        # strict types: a subclass of a msgpack type (np.float64 is a float, an IntEnum an
        # int) and every tuple go to `default`, which knows what they are (a recorder's
        # CALLS blocks pass one that also encodes the launch arguments it stored raw)
        self._packer = msgpack.Packer(use_bin_type=True, strict_types=True,
                                      default=default or _default)
        self._zstd = zstandard.ZstdCompressor(level=level)

    def packed(self, kind: int, obj: Any, compress: bool = True) -> bytes:
        raw = self._packer.pack(obj)
        if compress and len(raw) >= COMPRESS_MIN:
            return block(kind, self._zstd.compress(raw), ZSTD)
        return block(kind, raw, RAW)

    def blob_parts(self, blob_id: int, data: memoryview) -> Iterator[bytes]:
        """The BLOB blocks of one payload, in parts of `BLOB_PART` bytes (at least one)."""
        for pos in range(0, max(len(data), 1), BLOB_PART):
            part = data[pos:pos + BLOB_PART]
            if len(part) >= COMPRESS_MIN:
                codec, stored = ZSTD, self._zstd.compress(part)
            else:
                codec, stored = RAW, bytes(part)
            yield block(BLOB, BLOB_PREFIX.pack(blob_id, pos) + stored, codec)


def _default(value: Any) -> Any:
    """msgpack fallback: tuples as arrays, NumPy numbers and subclasses of built-in types as
    the built-in value, anything else as unrecordable."""
    if isinstance(value, tuple):
        return list(value)
    import numpy as np
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return {UNRECORDABLE: _short_repr(value)}


def _short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a repr that raises must not break recording
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 200 else text[:197] + "..."


# -- reading ---------------------------------------------------------------------

def read_file_header(f: BinaryIO, path: str) -> tuple[int, int]:
    """Check the file header; return (major, minor)."""
    raw = f.read(FILE_HEADER_SIZE)
    if len(raw) < FILE_HEADER_SIZE or raw[:8] != MAGIC:
        raise TraceError(f"{path} is not a HARP trace (no trace magic at byte 0)")
    _, major, minor, _ = FILE_HEADER.unpack(raw)
    if major != VERSION_MAJOR:
        raise TraceError(f"{path} is a version {major}.{minor} trace; this HARP reads version "
                         f"{VERSION_MAJOR}.x")
    return major, minor


class Tail:
    """How a block scan ended: cleanly at EOF, or at a torn (incomplete) block."""

    def __init__(self, offset: int, reason: str | None) -> None:
        self.offset, self.reason = offset, reason

    @property
    def torn(self) -> bool:
        return self.reason is not None


def scan_blocks(f: BinaryIO, path: str, start: int, size: int, *,
                read_kinds: frozenset[int] = frozenset((HEADER, CALLS, END)),
                ) -> Iterator[tuple[int, int, int, int, bytes | None] | Tail]:
    """Walk the blocks from `start` to `size`, checking every header and the CRC of every body
    it reads. Yields (offset, kind, codec, length, body) per block (body None for kinds not in
    `read_kinds`, which are skipped unread, as are kinds this version does not know: a later
    minor version may add them), then one `Tail`.

    A block that runs past `size`, a header cut short, or a tail of zero bytes (what some
    file systems leave after a crash) ends the scan as torn. Anything else wrong raises
    `TraceCorruptError` with the block's offset.
    """
    offset = start
    f.seek(offset)
    while offset < size:
        head = f.read(BLOCK_HEADER_SIZE)
        if len(head) < BLOCK_HEADER_SIZE:
            yield Tail(offset, f"an incomplete block header ({len(head)} of {BLOCK_HEADER_SIZE} "
                               "bytes)")
            return
        sync, kind, codec, length, body_crc, head_crc = BLOCK_HEADER.unpack(head)
        if sync != BLOCK_SYNC or zlib.crc32(head[:12]) != head_crc:
            if _zero_tail(f, offset, size, head):
                yield Tail(offset, f"{size - offset} zero bytes where a block should start")
                return
            what = "no block mark" if sync != BLOCK_SYNC else "block header checksum mismatch"
            raise TraceCorruptError(path, offset, what)
        if kind == 0 or codec not in (RAW, ZSTD) or length > MAX_BODY:
            raise TraceCorruptError(path, offset, f"impossible block (kind {kind}, codec {codec}, "
                                                  f"{length} bytes)")
        end = offset + BLOCK_HEADER_SIZE + length
        if end > size:
            yield Tail(offset, f"an incomplete {BLOCK_NAMES.get(kind, 'unknown')} block "
                               f"({size - offset} of {end - offset} bytes)")
            return
        body = None
        if kind in read_kinds:
            body = f.read(length)
            if zlib.crc32(body) != body_crc:
                raise TraceCorruptError(path, offset, f"{BLOCK_NAMES[kind]} block body checksum "
                                                      f"mismatch (bytes {offset + BLOCK_HEADER_SIZE}"
                                                      f"..{end})")
        else:
            f.seek(end)
        yield offset, kind, codec, length, body
        offset = end
    yield Tail(offset, None)


def _zero_tail(f: BinaryIO, offset: int, size: int, head: bytes) -> bool:
    """True when every byte from `offset` to the end of the file is zero."""
    if head.strip(b"\0"):
        return False
    pos = offset + len(head)
    while pos < size:
        chunk = f.read(min(1 << 20, size - pos))
        if not chunk or chunk.strip(b"\0"):
            return False
        pos += len(chunk)
    return True


_unpack_opts = dict(raw=False, use_list=True, strict_map_key=False)


def decode_body(codec: int, body: bytes, path: str, offset: int) -> Any:
    """The msgpack value inside a HEADER, CALLS or END body (CRC already checked)."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(body) if codec == ZSTD else body
        return msgpack.unpackb(raw, **_unpack_opts)
    except Exception as exc:  # the CRC matched, so the writer wrote garbage: still name where
        raise TraceCorruptError(path, offset, f"undecodable block body: {exc}") from None


def decode_blob_part(codec: int, body: bytes, path: str, offset: int) -> tuple[int, int, bytes]:
    """(blob id, offset in blob, raw bytes) of a BLOB body."""
    if len(body) < BLOB_PREFIX.size:
        raise TraceCorruptError(path, offset, "blob block shorter than its prefix")
    blob_id, pos = BLOB_PREFIX.unpack_from(body)
    data = body[BLOB_PREFIX.size:]
    if codec == ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(data)
        except Exception as exc:
            raise TraceCorruptError(path, offset, f"undecodable blob part: {exc}") from None
    return blob_id, pos, data
