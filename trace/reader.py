"""Reading a trace: `TraceFile` checks the framing on open and streams the calls.

    with TraceFile("run.harptrace") as trace:
        print(trace.device["name"], trace.payloads)
        for call in trace.calls():
            print(call.seq, call.api, call.duration_ns, call.error)

Opening walks every block and checks its CRCs (with `verify=False`, payload
blobs are skipped and checked only when `blob()` reads them). A torn last block
(a writer that died mid-write) is dropped with a `TraceTruncatedWarning`; damage
anywhere else raises `TraceCorruptError`, which names the byte offset.
"""
from __future__ import annotations

import os
import warnings
import zlib
from typing import Any, Iterator, NamedTuple

from . import format as fmt
from .format import (API_NAMES, CALLS, END, HEADER, OPS, SYNC_OPS, TraceCorruptError,
                     TraceError, TraceIncompleteWarning, TraceTruncatedWarning)


class CallError(NamedTuple):
    """An exception a recorded call raised: its class name, HarpError code and message, and,
    for a deferred failure, the asynchronous call that failed (its API name and seq)."""
    type: str
    code: str | None
    message: str
    call: str | None
    seq: int | None

    def __str__(self) -> str:
        where = f" ({self.call} #{self.seq})" if self.call is not None else ""
        return f"{self.type}{where}: {self.message}"


class Call:
    """One recorded call. Times are ns since the trace's origin (when recording began)."""

    __slots__ = ("op", "seq", "t0", "t1", "error", "fields")

    def __init__(self, op: int, seq: int, t0: int, t1: int, error: CallError | None,
                 fields: list) -> None:
        self.op, self.seq, self.t0, self.t1, self.error, self.fields = op, seq, t0, t1, error, \
            fields

    @property
    def api(self) -> str:
        return API_NAMES.get(self.op, f"op{self.op}")

    @property
    def sync(self) -> bool:
        return self.op in SYNC_OPS

    @property
    def duration_ns(self) -> int:
        return self.t1 - self.t0

    def __getitem__(self, name: str) -> Any:
        """A field by its name in docs/trace-format.md (e.g. call["nbytes"])."""
        names = OPS[self.op][1]
        try:
            return self.fields[names.index(name)]
        except (ValueError, IndexError):
            raise KeyError(f"{self.api} records have no field {name!r}") from None

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Any]:
        """Every field by name (bytes as hex), for JSON output."""
        out: dict[str, Any] = {"seq": self.seq, "api": self.api, "t0_ns": self.t0,
                               "t1_ns": self.t1}
        for name, value in zip(OPS[self.op][1], self.fields):
            out[name] = value.hex() if isinstance(value, bytes) else value
        if self.error is not None:
            out["error"] = self.error._asdict()
        return out

    def __repr__(self) -> str:
        return f"<Call #{self.seq} {self.api} {self.duration_ns} ns>"


class TraceFile:
    """An open trace file. Warnings about its end are in `warnings` and are also issued with
    the `warnings` module (`TraceTruncatedWarning`, `TraceIncompleteWarning`)."""

    def __init__(self, path: str | os.PathLike, *, warn: bool = True, verify: bool = True
                 ) -> None:
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise TraceError(f"cannot open trace {self.path}: {exc.strerror or exc}") from None
        try:
            self._open(warn, verify)
        except BaseException:
            self._file.close()
            raise

    def _open(self, warn: bool, verify: bool) -> None:
        f = self._file
        self.size = os.fstat(f.fileno()).st_size
        self.version = fmt.read_file_header(f, self.path)
        self.warnings: list[str] = []
        self.header: dict[str, Any] = {}
        self.end: dict[str, Any] | None = None
        self._blobs: dict[int, list[tuple[int, int, int]]] = {}
        self.call_blocks = 0
        self.position = fmt.FILE_HEADER_SIZE
        tail = None
        first = True
        kinds = frozenset((HEADER, CALLS, END) + ((fmt.BLOB,) if verify else ()))
        for item in fmt.scan_blocks(f, self.path, fmt.FILE_HEADER_SIZE, self.size,
                                    read_kinds=kinds):
            if isinstance(item, fmt.Tail):
                tail = item
                break
            offset, kind, codec, length, body = item
            if first:
                if kind != HEADER:
                    raise TraceCorruptError(self.path, offset, "the first block is not a header")
                self.header = fmt.decode_body(codec, body, self.path, offset)
                if not isinstance(self.header, dict):
                    raise TraceCorruptError(self.path, offset, "the header is not a map")
                first = False
            elif kind == CALLS:
                self.call_blocks += 1
            elif kind == fmt.BLOB:
                if body is not None:
                    if len(body) < fmt.BLOB_PREFIX.size:
                        raise TraceCorruptError(self.path, offset,
                                                "blob block shorter than its prefix")
                    blob_id = fmt.BLOB_PREFIX.unpack_from(body)[0]
                    self._blobs.setdefault(blob_id, []).append((offset, codec, length))
                else:
                    self._blobs.setdefault(-1, []).append((offset, codec, length))
            elif kind == END:
                self.end = fmt.decode_body(codec, body, self.path, offset)
            elif kind == HEADER:
                raise TraceCorruptError(self.path, offset, "a second header block")
        assert tail is not None
        self.data_end = tail.offset
        if first:
            raise TraceError(f"{self.path} holds no trace header (truncated at byte "
                             f"{tail.offset}: {tail.reason or 'empty'})")
        if tail.torn:
            self._warn(TraceTruncatedWarning,
                       f"trace {self.path} is truncated at byte offset {tail.offset}: "
                       f"{tail.reason}; it was dropped, the {self.size - tail.offset} bytes "
                       "before it are complete records", warn)
        elif self.end is None:
            self._warn(TraceIncompleteWarning,
                       f"trace {self.path} has no end block: the recording process stopped "
                       "without closing the device (or is still recording)", warn)
        self._index_blobs()

    def _warn(self, category: type[Warning], message: str, warn: bool) -> None:
        self.warnings.append(message)
        if warn:
            warnings.warn(message, category, stacklevel=4)

    def _index_blobs(self) -> None:
        """Blob id -> its parts, from the BLOB block prefixes (read lazily, 16 bytes each)."""
        parts = self._blobs.pop(-1, [])
        for offset, codec, length in parts:
            self._file.seek(offset + fmt.BLOCK_HEADER_SIZE)
            prefix = self._file.read(fmt.BLOB_PREFIX.size)
            if len(prefix) < fmt.BLOB_PREFIX.size:
                raise TraceCorruptError(self.path, offset, "blob block shorter than its prefix")
            blob_id, _ = fmt.BLOB_PREFIX.unpack(prefix)
            self._blobs.setdefault(blob_id, []).append((offset, codec, length))

    # -- facts ---------------------------------------------------------------------
    @property
    def device(self) -> dict[str, Any]:
        return self.header.get("device") or {}

    @property
    def payloads(self) -> bool:
        """True when the bytes of every write were recorded."""
        return bool(self.header.get("payloads"))

    @property
    def origin_ns(self) -> int:
        return int(self.header.get("origin_ns", 0))

    @property
    def complete(self) -> bool:
        """True when the trace ends with its END block (the recorder was closed)."""
        return self.end is not None and self.data_end == self.size

    # -- content -------------------------------------------------------------------
    def calls(self) -> Iterator[Call]:
        """The recorded calls, in the order they were written; `position` follows the file."""
        origin = self.origin_ns
        f = self._file
        for item in fmt.scan_blocks(f, self.path, fmt.FILE_HEADER_SIZE, self.data_end,
                                    read_kinds=frozenset((CALLS,))):
            if isinstance(item, fmt.Tail):
                self.position = item.offset
                return
            offset, kind, codec, length, body = item
            self.position = offset + fmt.BLOCK_HEADER_SIZE + length
            if kind != CALLS:
                continue
            flat = fmt.decode_body(codec, body, self.path, offset)
            if not isinstance(flat, list):
                raise TraceCorruptError(self.path, offset, "a calls block is not an array")
            here = f.tell()
            for rec in _records(flat, self.path, offset):
                yield _call(rec, origin, self.path, offset)
            f.seek(here)    # a consumer may have read a blob in between

    def read_all(self) -> list[Call]:
        return list(self.calls())

    def blob(self, blob_id: int) -> bytes:
        """The payload stored as `blob_id` (a module image or write data)."""
        parts = self._blobs.get(blob_id)
        if not parts:
            raise TraceError(f"trace {self.path} has no blob {blob_id}")
        chunks = []
        for offset, codec, length in parts:
            self._file.seek(offset)
            block = self._file.read(fmt.BLOCK_HEADER_SIZE + length)
            body = block[fmt.BLOCK_HEADER_SIZE:]
            if zlib.crc32(body) != fmt.BLOCK_HEADER.unpack_from(block)[4]:
                raise TraceCorruptError(self.path, offset, "blob block body checksum mismatch")
            _, pos, data = fmt.decode_blob_part(codec, body, self.path, offset)
            chunks.append(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @property
    def blob_count(self) -> int:
        return len(self._blobs)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TraceFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ARITY = {op: fmt.FIELDS_AT + len(spec[1]) for op, spec in OPS.items()}


def _records(flat: list, path: str, offset: int) -> Iterator[list]:
    """Split a CALLS block's flat array into records: each takes 5 + its op's field count."""
    i, n = 0, len(flat)
    while i < n:
        op = flat[i]
        size = _ARITY.get(op) if type(op) is int else None
        if size is None or i + size > n:
            raise TraceCorruptError(path, offset, f"malformed call record at element {i} of the "
                                                  f"block (op {op!r})")
        yield flat[i:i + size]
        i += size


def _call(rec: Any, origin: int, path: str, offset: int) -> Call:
    try:
        op, seq, t0, t1, error = rec[:5]
        if op not in OPS:
            raise ValueError(f"unknown op {op}")
        err = CallError(*error) if error is not None else None
        return Call(op, seq, t0 - origin, t1 - origin, err, rec[5:])
    except (TypeError, ValueError) as exc:
        raise TraceCorruptError(path, offset, f"malformed call record in the block: {exc}") \
            from None


def open_trace(path: str | os.PathLike, *, warn: bool = True) -> TraceFile:
    """Open a trace for reading (see `TraceFile`)."""
    return TraceFile(path, warn=warn)
