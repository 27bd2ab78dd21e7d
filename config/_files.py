"""Reading the text files settings name (the config itself, htpasswd, groups, passwords,
lifecycle policies): one error for a file that cannot be read and for one that is not UTF-8,
whose message says which line holds the bad byte, so no caller shows a decoding traceback."""

from __future__ import annotations

from pathlib import Path

__all__ = ["UnreadableFile", "read_text"]


class UnreadableFile(Exception):
    """The file cannot be read, or is not UTF-8; the message says why (``No such file or
    directory``, ``line 2 is not UTF-8 (byte 0xe9)``) without naming the file."""


def read_text(path: Path) -> str:
    """The file's text, decoded as UTF-8; blocks."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UnreadableFile(f"line {line} is not UTF-8 (byte 0x{data[exc.start]:02x})") from None
