"""Reading wall-clock stamps against now.

Tag, list, read and write times are wall-clock seconds: they are kept in the index and in file
times, across restarts. A stamp far ahead of now means the clock was stepped back since it was
taken (NTP correcting a clock that ran ahead, a machine that booted at a wrong date). Such a
stamp is neither fresh nor recent: taken as either, a tag would go unrevalidated, and a blob be
held as in use, for as long as the step.

A stamp a little ahead is an ordinary one: taken after ``now`` was read, while a walk of the
store ran or a lock was waited for (a read a sweeper must see, a blob written during a gc
walk). It counts as within a window it is less than the window ahead of.
"""

from __future__ import annotations

__all__ = ["within"]


def within(stamp: float, now: float, seconds: float) -> bool:
    """Whether ``stamp`` is less than ``seconds`` before ``now``, or less than that after it."""
    return -seconds < now - stamp < seconds
