"""Output paths of the benchmark commands, checked before any work so that a bad one costs nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from halo_balance.errors import HaloBalanceError


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail unless ``path`` (a file or folder, existing or not) can be written.

    The nearest existing folder on the way must be a folder in which a temporary folder can be made
    and removed: a path below a regular file, in a folder without permission, or on a read-only or
    virtual file system (``/proc``) is refused with one line naming it. ``what`` names the option.
    """
    path = Path(path).absolute()
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise HaloBalanceError(f"{what} {path} cannot be created: {parent} is a file, not a folder; "
                               "choose a path outside it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as exc:
        raise HaloBalanceError(f"{what} {path} cannot be created: {parent} is not a writable folder "
                               f"({exc.strerror}); choose a folder you can write to") from None
