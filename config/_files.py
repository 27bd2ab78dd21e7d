"""Reading the files settings name (the config itself, htpasswd, groups, passwords, lifecycle
policies, TLS certificates): one error for a file that cannot be read and for one that is not
UTF-8, whose message says which line holds the bad byte, so no caller shows a decoding
traceback; and one stamp that tells a file's versions apart, for those read again on change."""

from __future__ import annotations

from pathlib import Path

__all__ = ["NO_FILE", "FileStamp", "UnreadableFile", "file_stamp", "read_text"]

#: What tells a version of a file from the next (mtime in nanoseconds, size, inode): two writes
#: within one tick of the file system's clock share an mtime, and often a size (a rotated
#: password of the same length); rarely an inode too (a Secret's update is a new file).
FileStamp = tuple[int, int, int]
#: The stamp of a file not there (or not set).
NO_FILE: FileStamp = (0, 0, 0)


class UnreadableFile(Exception):
    """The file cannot be read, or is not UTF-8; the message says why (``No such file or
    directory``, ``line 2 is not UTF-8 (byte 0xe9)``) without naming the file."""


def file_stamp(path: Path) -> FileStamp:
    """The file's version; OSError when it cannot be looked at. Blocks."""
    info = path.stat()
    return info.st_mtime_ns, info.st_size, info.st_ino


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
