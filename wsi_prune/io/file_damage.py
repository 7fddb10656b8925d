"""Why a slide file cannot be what it claims: a missing file or a broken link
(:func:`missing_reason`), a path that is no regular file (:func:`not_a_file`), and a TIFF
whose structure is damaged, such as a truncated copy (:func:`tiff_damage`).
:class:`~wsi_prune.io.slide.Slide` asks these before and after OpenSlide, so that its error
names the problem rather than OpenSlide's "unsupported".
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path

import numpy as np
import tifffile

# A TIFF with more directories than this is not a slide; stop walking a runaway chain.
_MAX_IFDS = 4096


def missing_reason(path: str | os.PathLike[str]) -> str:
    """Why a path that does not exist does not: a plain missing file, a broken symlink, or a
    symlink loop (``os.path.exists`` says False for all three)."""
    p = Path(path)
    if not p.is_symlink():
        return "no such file"
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
    return f"broken symlink (to {os.readlink(p)}, which does not exist)"


#: what an existing path that is no regular file is, and why it is no slide
_NOT_FILES = (
    (stat.S_ISDIR, "is a directory, not a slide file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a slide file: reading it waits for a writer"),
    (stat.S_ISSOCK, "is a socket, not a slide file"),
    (stat.S_ISCHR, "is a character device, not a slide file"),
    (stat.S_ISBLK, "is a block device, not a slide file"),
)


def not_a_file(path: str | os.PathLike[str]) -> str | None:
    """Why an existing path (links followed) is no regular file: a directory, a FIFO, a socket
    or a device; None for a regular file or a path that cannot be stat'ed. Asked before
    anything opens it: opening a FIFO blocks until something writes to it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, why in _NOT_FILES:
        if test(mode):
            return why
    return None if stat.S_ISREG(mode) else "is not a regular file"


def tiff_damage(path: Path) -> str | None:
    """Why a file with a TIFF header is structurally broken, or None if it looks whole.

    Walks the directory chain by hand (tifffile stops quietly at a directory offset past the
    end of the file, which is exactly what a truncated copy has), then asks tifffile for every
    page's strip/tile offsets and checks that the data lies inside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
        order = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\0", b"\0+")
        if len(head) < (16 if big else 8):
            return f"header cut short ({size} bytes)"
        count_fmt, entry_bytes, off_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
        count_bytes, off_bytes = struct.calcsize(count_fmt), struct.calcsize(off_fmt)
        off = struct.unpack(order + off_fmt, head[8:16] if big else head[4:8])[0]
        seen: set[int] = set()
        while off:
            i = len(seen)
            if off in seen or i >= _MAX_IFDS:
                return f"directory chain loops or runs away at directory {i}"
            seen.add(off)
            if off + count_bytes > size:
                return (f"directory {i} at byte {off} lies past the end of the file "
                        f"({size} bytes): truncated?")
            fh.seek(off)
            n = struct.unpack(order + count_fmt, fh.read(count_bytes))[0]
            end = off + count_bytes + n * entry_bytes + off_bytes
            if end > size:
                return (f"directory {i} ends at byte {end}, past the end of the file "
                        f"({size} bytes): truncated?")
            fh.seek(end - off_bytes)
            off = struct.unpack(order + off_fmt, fh.read(off_bytes))[0]
    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                offs = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                if offs.size:
                    data_end = int((offs + counts)[counts > 0].max(initial=0))
                    if data_end > size:
                        return (f"image data of page {i} ends at byte {data_end}, past the end "
                                f"of the file ({size} bytes): truncated?")
    except Exception as exc:  # any failure to parse the tags is damage, whatever its type
        return f"unreadable TIFF tags: {exc}"
    return None
