"""Small I/O helpers shared by every stage: atomic output folders and JSON files.

Outputs are written into a temporary sibling folder and renamed into place only when complete, so
an interrupted or failed run never leaves a half-written result behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import HaloBalanceError, OutputExistsError


#: Files that identify a folder written by this package, by kind. ``--overwrite`` replaces only
#: such a folder, an empty one, or one whose entries are all such folders (a run's output of several
#: parts, e.g. the demo, or a ``generate`` run interrupted while its model trained); anything else
#: is never deleted.
OUTPUT_SIGNATURES: dict[str, tuple[str, ...]] = {
    "prepared dataset": ("meta.json", "visits.parquet", "patients.parquet", "vocab.parquet"),
    "model": ("config.json", "model.safetensors", "conditions.json"),
    "training checkpoint": ("state.json", "config.json"),
    "evaluation report": ("report.json", "report.md"),
    "simulated cohort": ("simulation.json",),
    "k-fold run": ("run.json",),
}


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of output of this package that the folder ``path`` holds, or None (see :data:`OUTPUT_SIGNATURES`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    for kind, names in OUTPUT_SIGNATURES.items():
        if all((path / name).is_file() for name in names):
            return kind
    entries = [e for e in path.iterdir() if not _is_leftover(e.name)]
    if not entries:
        return "empty folder"
    if all(output_kind(e) not in (None, "empty folder") for e in entries):
        return "folder of outputs"
    return None


def _is_leftover(name: str) -> bool:
    # temporary and replaced folders of atomic_dir / atomic_write_bytes, left by a killed process
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def check_output_dir(path: str | os.PathLike, *, overwrite: bool,
                     inputs: Iterable[str | os.PathLike | None] = (), what: str = "output folder") -> Path:
    """Fail early, before any work is done, unless the folder ``path`` can be written.

    Refused, each with one line naming the problem and the fix: an empty path; ``path`` equal to,
    inside, or (when it exists) holding one of ``inputs``; an existing ``path`` without
    ``overwrite``; with ``overwrite``, an existing path that is a file, a link or a folder this
    package did not write (:func:`output_kind`), which is never deleted; a path that cannot be
    created (below a regular file, in a folder without write permission, on a read-only or virtual
    file system such as ``/proc``). Writing is checked by creating and removing a temporary folder
    in the nearest existing parent. ``what`` names the path in messages (e.g. ``"--out"``).
    """
    if not str(path).strip():
        raise HaloBalanceError(f"{what} is empty; give the folder to write")
    path = Path(path)
    where = f"{what} {path}"
    resolved = path.resolve()
    for src in inputs:
        if src is None or not str(src).strip():
            continue
        src_resolved = Path(src).resolve()
        if resolved == src_resolved:
            raise HaloBalanceError(f"{where} is also an input ({src}); write the output to another folder "
                                   "(an input is never replaced)")
        if src_resolved in resolved.parents:
            raise HaloBalanceError(f"{where} lies inside the input {src}; write the output outside the input")
        if resolved in src_resolved.parents and path.exists():
            raise HaloBalanceError(f"{where} holds the input {src}; replacing it would delete the input: "
                                   "write the output to another folder")
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a symbolic link" if path.is_symlink() else "a file"
        raise OutputExistsError(f"{where} exists and is {kind}, not a folder of ours: it is never replaced; "
                                "choose another path")
    if path.exists():
        if not overwrite:
            raise OutputExistsError(f"{where} already exists; choose another path or pass --overwrite")
        if output_kind(path) is None:
            raise OutputExistsError(
                f"{where} exists and was not written by halo_balance (it holds none of the files of a "
                "prepared dataset, model, report or simulated cohort), so --overwrite does not delete it; "
                "choose another path, or remove it yourself")
    check_writable(path, where)
    return path


def check_writable(path: str | os.PathLike, where: str) -> None:
    """Fail unless the file or folder ``path`` can be created (or replaced) in its nearest existing
    folder, probed with a temporary folder; ``where`` starts the message (e.g. ``"--out x.html"``)."""
    path = Path(path)
    parent = path.parent if path.exists() else path
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise HaloBalanceError(f"{where} cannot be created: {parent} is a broken symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise HaloBalanceError(f"{where} cannot be created: {parent} is a file, not a folder; "
                               "choose a path outside it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".halo_balance-probe-", dir=parent))
    except OSError as exc:
        raise HaloBalanceError(f"{where} cannot be created: {parent} is not writable ({exc.strerror}); "
                               "choose a folder you can write to") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` only if the ``with`` block succeeds.

    On error the temporary folder is removed and an existing ``path`` is left untouched.
    With ``overwrite=True`` an existing ``path`` is replaced only after the new content is complete.
    """
    path = check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes the folder private; outputs follow the umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonable(obj: Any) -> Any:
    # numpy scalars/arrays and Paths show up in parameters and counts
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
