"""Exceptions raised on bad input.

Every message names what is wrong and where (file, column, value) and, when there is one, the fix.
Command-line entry points turn these into a one-line error and a non-zero exit (see ``cli.run``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TypeVar


class HaloBalanceError(Exception):
    """Base class for every error this package raises on bad input or bad usage."""


class DatasetError(HaloBalanceError, ValueError):
    """A prepared dataset (or a raw input table) does not satisfy its format.

    Parameters
    ----------
    message : str
        What is wrong.
    file, column : str, optional
        Where it is wrong; prefixed to the message.
    value : object, optional
        The offending value, shown in the message.
    fix : str, optional
        How to repair it.
    """

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None,
                 value: object = None, fix: str | None = None) -> None:
        self.file, self.column, self.value, self.fix = file, column, value, fix
        where = ", ".join(p for p in (file and f"file {file}", column and f"column {column!r}") if p)
        text = f"{where}: {message}" if where else message
        if value is not None:
            text += f" (offending value: {value!r})"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)


class OutputExistsError(HaloBalanceError, FileExistsError):
    """The output folder already exists and overwriting was not requested."""


class IncompatibleModelError(HaloBalanceError, ValueError):
    """A trained model does not match a dataset (vocabulary or conditioning layout)."""


class MissingDependencyError(HaloBalanceError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def import_optional(module: str, *, extra: str, needed_for: str, note: str = ""):
    """Import and return ``module``, or raise :class:`MissingDependencyError` naming ``pip install -e ".[extra]"``.

    ``note`` is added to the message (e.g. the package's licence).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        text = (f"{needed_for}: the optional package {module.split('.')[0]!r} is not installed "
                f"({exc.__class__.__name__}: {exc}). Install it with: pip install -e \".[{extra}]\"")
        raise MissingDependencyError(text + (f". {note}" if note else "")) from exc


E = TypeVar("E", bound=Exception)


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a mistyped ``value``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(what: str, values: Iterable[str], choices: Iterable[str], *,
                   error: type[E] = HaloBalanceError) -> E:
    """The error for ``values`` that are not among ``choices``: names each, suggests the closest, lists all.

    ``what`` names the option, e.g. ``"--methods"``; ``error`` is the exception class to return
    (e.g. :class:`DatasetError` for a dataset's attribute, ``ValueError`` for a function argument).
    """
    choices = list(choices)
    bad = ", ".join(f"{v!r}{did_you_mean(v, choices)}" for v in values)
    return error(f"{what}: unknown {bad}; choose from {', '.join(map(str, choices))}")
