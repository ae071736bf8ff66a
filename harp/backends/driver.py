"""`DriverBackend`: a backend over a driver library that is probed once, and its cards.

A real device's backend (CuPy, PyOpenCL, ONNX Runtime) finds out once whether its
driver loads and sees devices (`_probe`, cached: `available()` never raises and
always gives the same answer), refuses to describe or open anything when it
does not (`BackendError` with the reason), and keeps one card object per device
and process (`_make_card`), shared by the sessions on it. A session's memory is
the card's capacity or its quota, whichever is smaller; the backend writes
`_info` (the facts) and `_session` (the `BackendDevice`).
"""
from __future__ import annotations

import abc
import threading
from typing import Any

from ..device import Device
from ..errors import BackendError
from ..tenancy import Tenancy
from ..types import DeviceInfo
from . import Backend


class DriverBackend(Backend):
    """A backend whose driver is probed once and whose devices are cards (see above)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._lock = threading.Lock()
        self._status: tuple[bool, str] | None = None
        self._cards: dict[int, Any] = {}

    # -- hooks -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _probe(self) -> tuple[bool, str]:
        """Load the driver and find the devices: (True, "") or (False, why not)."""

    @abc.abstractmethod
    def _make_card(self, index: int) -> Any:
        """The card of device `index` (has `capacity`, in bytes)."""

    @abc.abstractmethod
    def _info(self, card: Any, memory: int, trusted: bool = False) -> DeviceInfo:
        """The facts of `card` for a session of `memory` bytes (`trusted`: it may take
        formats that run client code)."""

    @abc.abstractmethod
    def _session(self, card: Any, info: DeviceInfo, tenancy: Tenancy,
                 trust_client_code: bool) -> Device:
        """The session (a `BackendDevice`) on `card`."""

    # -- the shared part -------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        with self._lock:
            if self._status is None:
                try:
                    self._status = self._probe()
                except Exception as exc:   # never raise from here
                    self._status = (False, f"the {self.name} backend failed to start: "
                                           f"{type(exc).__name__}: {exc}")
            return self._status

    def _require(self) -> None:
        ok, reason = self.available()
        if not ok:
            raise BackendError(f"the {self.name} backend is unavailable here: {reason}")

    def _card(self, index: int) -> Any:
        with self._lock:
            card = self._cards.get(index)
            if card is None:
                card = self._cards[index] = self._make_card(index)
            return card

    def describe(self, index: int) -> DeviceInfo:
        self._require()
        self.check_index(index)
        card = self._card(index)
        return self._info(card, card.capacity)

    def open(self, index: int = 0, *, memory_quota: int | None = None,
             trust_client_code: bool = False, tenancy: Tenancy | None = None) -> Device:
        self._require()
        self.check_index(index)
        card = self._card(index)
        memory = card.capacity if memory_quota is None else min(memory_quota, card.capacity)
        if tenancy is None:
            tenancy = Tenancy(self.local_memory(index, card.capacity, memory_quota))
        return self._session(card, self._info(card, memory, trust_client_code), tenancy,
                             trust_client_code)
