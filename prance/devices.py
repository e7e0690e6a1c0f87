"""Which device a command runs on: ``--device`` text checked once, with a fix when it cannot work.

Every command takes ``--device`` (default ``cpu``). Asking for CUDA on a machine without a
visible GPU is a user error with a one-line fix, not a traceback from deep inside torch.
"""

from __future__ import annotations

import re

import torch

from prance.errors import PranceError

#: What ``--device`` accepts: ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(text: str | None = "cpu", flag: str = "--device") -> torch.device:
    """The :class:`torch.device` named by ``text`` (None means ``cpu``), checked to exist here."""
    text = "cpu" if text is None else text.strip().lower()
    if not DEVICE_PATTERN.fullmatch(text):
        raise PranceError(f"{flag} {text!r} is not a device; use cpu, cuda or cuda:N")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PranceError(f"{flag} {text}: no CUDA device is visible (torch.cuda.is_available() is False); "
                              f"use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PranceError(f"{flag} {text}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1}); "
                              "pick one of them")
    return device


__all__ = ["DEVICE_PATTERN", "resolve_device"]
