"""Append-only JSON-lines files that survive a kill: the training log and the ``generate-extended`` journal.

Each record is one line written with a single ``write`` and fsynced, so only
the last line can be incomplete.  :func:`repair_tail` runs before a file is
read or appended to again: it completes a last line that holds a whole record
but lacks its newline, and cuts off one that was torn mid-write, so the next
record starts on a line of its own.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_BLOCK = 1 << 16


def append(f, record: dict) -> None:
    """Write ``record`` as one line of the open text file ``f`` and fsync it."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def repair_tail(path) -> int:
    """Make ``path`` end with a complete line; returns the number of bytes cut off (0 if none)."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        start = _last_line_start(f, size)
        f.seek(start)
        fragment = f.read()
        try:
            whole = isinstance(json.loads(fragment), dict)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            whole = False
        if whole:
            f.write(b"\n")
            cut = 0
            log.warning("%s: its last record lacked a newline; completed it", path)
        else:
            f.truncate(start)
            cut = size - start
            log.warning("%s: cut off a torn last line of %d bytes (an interrupted write)", path, cut)
        f.flush()
        os.fsync(f.fileno())
    return cut


def _last_line_start(f, size: int) -> int:
    """Offset just after the last newline of the file (0 if it has none)."""
    end = size
    while end > 0:
        begin = max(0, end - _BLOCK)
        f.seek(begin)
        i = f.read(end - begin).rfind(b"\n")
        if i >= 0:
            return begin + i + 1
        end = begin
    return 0
