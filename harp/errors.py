"""The `HarpError` hierarchy and the typed error records that cross the wire.

One tree, with transport failures apart from device failures, so a caller can
tell "the network broke" from "my kernel is wrong". Every error carries a
stable `code` (the wire identity of its class), and a failure of an
asynchronous call also names that call: its API name and sequence number.
"""
from __future__ import annotations

import re
from typing import Any


class HarpError(Exception):
    """Base of every error HARP raises."""

    code = "INTERNAL"

    def __init__(self, message: str, *, call: str | None = None, seq: int | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.call = call
        self.seq = seq
        self.detail = detail

    def __str__(self) -> str:
        text = self.message
        if self.call is not None:
            text = f"{self.call} (call #{self.seq}) failed: {text}"
        if self.detail:
            text += "\n--- remote detail ---\n" + self.detail.rstrip()
        return text

    def to_record(self) -> dict[str, Any]:
        """The error as a plain record for the wire (never a pickle)."""
        return {"code": self.code, "message": self.message, "call": self.call,
                "seq": self.seq, "detail": self.detail}


class ArgumentError(HarpError, ValueError):
    """A call got a value it cannot accept: a bad size, offset or length."""
    code = "INVALID_ARGUMENT"


class InvalidHandleError(ArgumentError):
    """A handle that is freed, of the wrong kind, or not this session's."""
    code = "INVALID_HANDLE"


class UnsupportedError(HarpError):
    """The device cannot do what was asked (an image format it does not accept)."""
    code = "UNSUPPORTED"


class PermissionDeniedError(UnsupportedError):
    """Refused by policy, e.g. client Python code on an untrusted server."""
    code = "PERMISSION_DENIED"


class DeviceError(HarpError):
    """The device itself failed the call (a kernel fault, a driver error)."""
    code = "DEVICE"


class OutOfMemoryError(DeviceError):
    """The device has not enough free memory for an allocation."""
    code = "OUT_OF_MEMORY"


class QuotaError(HarpError):
    """The session's quota (memory, compute) does not allow the call."""
    code = "QUOTA"


class NoCapacityError(HarpError):
    """The pool has no device that can take the request now."""
    code = "NO_CAPACITY"


class AuthError(HarpError):
    """Authentication failed: missing or wrong certificate or token."""
    code = "AUTH"


class LeaseError(AuthError):
    """The lease is unknown, expired, or not for this device."""
    code = "LEASE"


class ProtocolError(HarpError):
    """A malformed or unexpected message on the wire."""
    code = "PROTOCOL"


class VersionMismatchError(ProtocolError):
    """Client and server share no protocol version."""
    code = "VERSION"


class TransportError(HarpError):
    """The connection failed: server unreachable, died, or timed out."""
    code = "TRANSPORT"


class NotLeaderError(TransportError):
    """A scheduler replica that does not lead was asked to change state; the message names
    the leader, and clients move on to it (or to their next scheduler address)."""
    code = "NOT_LEADER"


class BackendError(HarpError):
    """A backend is unknown, unavailable here, or of the wrong plugin version."""
    code = "BACKEND"


class InternalError(HarpError):
    """A bug in HARP, or an error code this version does not know."""
    code = "INTERNAL"


ERROR_CLASSES: dict[str, type[HarpError]] = {
    cls.code: cls for cls in (
        HarpError, ArgumentError, InvalidHandleError, UnsupportedError,
        PermissionDeniedError, DeviceError, OutOfMemoryError, QuotaError, NoCapacityError, AuthError,
        LeaseError, ProtocolError, VersionMismatchError, TransportError, NotLeaderError,
        BackendError,
        InternalError)
}


def from_record(record: dict[str, Any]) -> HarpError:
    """Rebuild an error from its wire record; an unknown code becomes `InternalError`."""
    cls = ERROR_CLASSES.get(record.get("code", ""), InternalError)
    return cls(str(record.get("message", "")), call=record.get("call"),
               seq=record.get("seq"), detail=record.get("detail"))


# -- exceptions raised by a kernel (numba-python kernels run Python) ------------------

#: How a device words a Python exception its kernel raised: numba-python kernels (the cpu
#: backend's simulator) raise real Python exceptions, which cross the wire as a
#: `DeviceError` with this message, so a client can raise the same type again
#: (`kernel_exception`).
_KERNEL_RAISED = re.compile(r"kernel (?P<kernel>[\w.<>]+) raised (?P<type>[A-Za-z_][\w.]*): "
                            r"(?P<message>.*?)"
                            r"( \(\d+ (later|more) asynchronous failure.*\))?\Z", re.S)


def kernel_raised(kernel: str, exc: BaseException) -> DeviceError:
    """The `DeviceError` for a Python exception raised by kernel `kernel` on the device."""
    return DeviceError(f"kernel {kernel} raised {type(exc).__name__}: {exc}")


def kernel_exception(error: HarpError) -> tuple[str, str, str] | None:
    """(kernel, exception type name, its message) if `error` is a kernel's own exception
    (`kernel_raised`), else None."""
    if not isinstance(error, DeviceError):
        return None
    found = _KERNEL_RAISED.match(error.message)
    if found is None:
        return None
    return found["kernel"], found["type"], found["message"]
