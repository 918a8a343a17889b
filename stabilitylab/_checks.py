"""Argument checks shared by the public entry points (each caller words its own error)."""

from __future__ import annotations

from typing import Any


def int_at_least(value: Any, lo: int) -> bool:
    """True for a real int (not a bool) that is ``>= lo``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def check_every(every: Any, where: str, none_ok: bool = False) -> int | None:
    """``every`` if it is a valid logging interval (an int >= 1), else a ValueError naming ``where``.

    Args:
        every: the interval to check.
        where: how the caller spells the argument, e.g. ``"Monitor(every"``; the message reads
            ``"Monitor(every=0): must be an int >= 1 (1 logs every step)"``.
        none_ok: also accept None (no logging at all).
    """
    if none_ok and every is None:
        return None
    if not int_at_least(every, 1):
        hint = ", or None for no monitoring" if none_ok else ""
        raise ValueError(f"{where}={every!r}): must be an int >= 1 (1 logs every step){hint}")
    return every
