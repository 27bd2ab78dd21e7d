"""Reading wall-clock stamps against now.

Tag, list, read and write times are wall-clock seconds: they are kept in the index and in file
times, across restarts. A stamp ahead of now means the clock was stepped back since it was taken
(NTP correcting a clock that ran ahead, a machine that booted at a wrong date). Such a stamp is
neither fresh nor recent: taken as either, a tag would go unrevalidated, and a blob be held as
in use, for as long as the step.
"""

from __future__ import annotations

__all__ = ["within"]


def within(stamp: float, now: float, seconds: float) -> bool:
    """Whether ``stamp`` is less than ``seconds`` before ``now``, and not after it."""
    return 0.0 <= now - stamp < seconds
