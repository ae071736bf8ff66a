"""Bounds on what one session can make a device (and a pool server) hold.

Every device implementation applies the same bounds, so a program that fits
locally fits remotely: past one of them a call fails with a `QuotaError`
naming the bound (deferred, like any failure of an asynchronous call).
Device memory and module images count against the session's memory quota
(`harp.tenancy`); these bound the rest.
"""
from __future__ import annotations

#: Live handles of each kind per session.
MAX_BUFFERS = 1 << 17
MAX_STREAMS = 256
MAX_EVENTS = 1 << 16
MAX_MODULES = 1024
MAX_FUNCTIONS = 1 << 16
#: Longest message a kept deferred error carries (longer ones are cut, and say so).
MAX_ERROR_MESSAGE = 1024
