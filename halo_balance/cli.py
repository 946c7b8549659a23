"""Shared command-line plumbing and the ``halo-balance`` console script.

Each stage is a module with its own ``main(argv)`` (``python -m halo_balance.train`` ...). The console
script dispatches ``halo-balance <command> ...`` to the same functions. :func:`run` turns this
package's input errors into one clear line on stderr and exit status 2, never a traceback, and
Ctrl-C into exit status 130 with a line that says what was kept: commands that keep resumable
state (training checkpoints, finished units) say so with :func:`interrupt_note`. Option types
shared by several commands live here too (:func:`json_object`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import HaloBalanceError

COMMANDS = {
    "simulate": "data_prep.simulate",
    "prepare-mimic-iv": "data_prep.mimic_iv",
    "prepare-eicu": "data_prep.eicu",
    "prepare-meds": "data_prep.meds",
    "split": "halo_balance.split",
    "train": "halo_balance.train",
    "sample": "halo_balance.sample",
    "evaluate": "halo_balance.evaluate",
    "generate": "halo_balance.generate",
    "export": "halo_balance.export",
    "hf": "halo_balance.hf",
    "kfold": "benchmarks.kfold",
    "audit": "benchmarks.audit",
}


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 2 with a message on a :class:`HaloBalanceError`."""
    try:
        main(argv)
    except HaloBalanceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"interrupted; {getattr(exc, 'kept', None) or 'no partial output was kept'}", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


@contextlib.contextmanager
def interrupt_note(note: str | Callable[[], str | None]) -> Iterator[None]:
    """On Ctrl-C inside the block, :func:`run` reports ``note`` (what was kept and how to go on).

    ``note`` may be a function, called at the interruption (what was kept may depend on how far
    the work got); ``None`` or ``""`` keeps the default "no partial output was kept". The innermost
    block that has something to say wins.
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        if not getattr(exc, "kept", None):
            exc.kept = note() if callable(note) else note
        raise


def json_object(text: str) -> dict[str, Any]:
    """The argparse ``type`` of an option that takes a JSON object (``--train-options '{"epochs": 20}'``).

    Invalid JSON, or JSON that is not an object, is a usage error naming the value and an example.
    """
    example = """write a JSON object of option: value pairs in single quotes, e.g. '{"preset": "small", "epochs": 20}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}; {example}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__} {text!r}; {example}")
    return value


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: halo-balance <command> [options]\n\ncommands:\n" +
              "\n".join(f"  {c:<18} python -m {m}" for c, m in COMMANDS.items()), file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(COMMANDS[argv[0]])
    run(module.main, argv[1:])
