"""Errors of the numba.cuda shim: every unsupported API names itself."""
from __future__ import annotations

from typing import Any, NoReturn

from harp.errors import UnsupportedError

HINT = "see `harp.client.numba_shim` (or the README) for what HARP's numba.cuda supports"


class UnsupportedAttributeError(UnsupportedError, AttributeError):
    """An attribute HARP's numba.cuda does not provide.

    Also an `AttributeError`, so `hasattr` and `getattr(..., default)` behave as
    with any module, while a direct use fails with a message that names the API.
    """


def unsupported(api: str, why: str = "") -> NoReturn:
    """Raise `UnsupportedError` naming `api` (e.g. "numba.cuda.pinned_array")."""
    raise UnsupportedError(f"{api} is not supported under HARP" + (f": {why}" if why else "")
                           + f" ({HINT})")


class Unsupported:
    """A placeholder for an API HARP does not provide: any use raises `UnsupportedError`.

    The name still exists, so `from numba.cuda import pinned_array` in a program that
    never calls it keeps working; calling it, indexing it, iterating it or reading an
    attribute raises, naming the API.
    """

    __slots__ = ("_api", "_why")

    def __init__(self, api: str, why: str = "") -> None:
        self._api, self._why = api, why

    def _fail(self, *_: Any, **__: Any) -> NoReturn:
        unsupported(self._api, self._why)

    __call__ = __getitem__ = __iter__ = __len__ = __enter__ = _fail

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        unsupported(f"{self._api}.{name}", self._why)

    def __repr__(self) -> str:
        return f"<unsupported under HARP: {self._api}>"
