"""Exceptions raised on bad input.

Every message names what is wrong and where (file, column, value) and, when there is one, the fix.
Command-line entry points turn these into a one-line error and a non-zero exit (see ``cli.run``).
"""

from __future__ import annotations


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
