"""README.md as written: every Python block runs, every documented flag exists with its documented default.

The Python blocks run in README order, each in a fresh namespace, all in one temporary folder (so a
block may use what an earlier one wrote, as a reader following the README would), where the
README's paths are the real demo data: ``prepared/eicu`` the eICU demo prepared with
``--lab-source apache``, ``mimic-iv-2.2`` and ``eicu-demo-2.0`` the raw demos (read only). Only the
costs change: the substitutions below (each must still occur in the README) shrink epochs, folds
and cohort sizes.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import EICU_DEMO, MIMIC_DEMO, REPO, require

README = (REPO / "README.md").read_text()

#: README text -> what the test runs instead: the same code, cheaper.
SUBSTITUTIONS = {
    'TrainOptions(preset="small", seed=0)': 'TrainOptions(preset="tiny", epochs=1, seed=0)',
    'FairPlaySampler(group_columns=["gender"], random_state=0)':
        'FairPlaySampler(group_columns=["gender"], random_state=0, epochs=1)',
    "cv=5": "cv=2",
    "patients=5000": "patients=300",
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def bash_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines += [line.split(" #")[0] for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def test_every_substitution_still_applies():
    code = "".join(python_blocks())
    assert [k for k in SUBSTITUTIONS if k not in code] == []


class _Reader:
    """Runs the README's Python blocks in order, in one folder; remembers which ran."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.done = folder, 0

    def run_through(self, index: int) -> None:
        blocks = python_blocks()
        while self.done <= index:
            code = blocks[self.done]
            for old, new in SUBSTITUTIONS.items():
                code = code.replace(old, new)
            cwd = os.getcwd()
            os.chdir(self.folder)
            try:
                exec(compile(code, f"README.md python block {self.done + 1}", "exec"), {"__name__": "__readme__"})
            finally:
                os.chdir(cwd)
            self.done += 1


@pytest.fixture(scope="module")
def reader(tmp_path_factory, eicu_prepared) -> _Reader:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "prepared").mkdir()
    (folder / "prepared" / "eicu").symlink_to(eicu_prepared)
    (folder / "mimic-iv-2.2").symlink_to(require(MIMIC_DEMO))
    (folder / "eicu-demo-2.0").symlink_to(require(EICU_DEMO))
    return _Reader(folder)


@pytest.mark.parametrize("index", range(len(python_blocks())), ids=lambda i: f"block{i + 1}")
def test_python_block_runs_as_written(reader, index, recwarn):
    reader.run_through(index)


# ---------------------------------------------------------------------- command lines and their defaults
def _parser(module_name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        return module.build_parser()
    captured = {}

    def stop(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = stop
    try:
        with pytest.raises(SystemExit):
            module.main(*([[]] if inspect.signature(module.main).parameters else []))
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def documented_commands() -> list[tuple[str, list[str]]]:
    out = []
    for line in bash_commands():
        words = shlex.split(line)
        if "-m" in words and not words[0].startswith("python3"):
            at = words.index("-m") + 1
            out.append((words[at], [w.split("=")[0] for w in words[at + 1:] if w.startswith("--")]))
    return out


def test_every_documented_flag_exists():
    commands = documented_commands()
    assert {m for m, _ in commands} >= {"halo_balance.generate", "halo_balance.train", "halo_balance.sample",
                                        "halo_balance.evaluate", "halo_balance.split", "data_prep.mimic_iv",
                                        "data_prep.eicu", "data_prep.simulate", "benchmarks.kfold"}
    for module, flags in commands:
        if module == "pytest":
            continue
        known = set(_parser(module)._option_string_actions)
        assert [f for f in flags if f not in known] == [], module


def _sections() -> list[tuple[str, str]]:
    parts = re.split(r"^## ", README, flags=re.M)
    return [(p.splitlines()[0], p) for p in parts[1:]]


def test_documented_defaults_agree_with_help():
    """A default stated in a section (``(`--flag`, default X)``, ``--flag (default X)``, ``--flag X`` in an
    "Options:" or "Defaults:" list) is the default of that flag in one of the commands the section runs."""
    checked = 0
    for title, text in _sections():
        modules = sorted({m for m in re.findall(r"python -m ([\w.]+)", text) if m not in ("pytest",)})
        parsers = [_parser(m) for m in modules]
        claims = re.findall(r"`(--[a-z-]+)`,? default ([\w.]+)", text)
        claims += re.findall(r"`(--[a-z-]+)`\s+\(default ([\w.]+)\)", text)
        for listing in re.findall(r"(?:^Options:|Defaults:)(.*?)(?:\n\n|\Z)", text, flags=re.S | re.M):
            claims += re.findall(r"`(--[a-z-]+) (\d[\d.]*|tiny|small|base)`", listing)
        for flag, value in claims:
            defaults = [p._option_string_actions[flag].default for p in parsers if flag in p._option_string_actions]
            assert defaults, (title, flag)
            assert any(_same(d, value) for d in defaults), (title, flag, value, defaults)
            checked += 1
    assert checked >= 10


def _same(default, text: str) -> bool:
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(default) == float(text)
        except ValueError:
            return False
    return str(default) == text


def test_console_command_table_lists_every_subcommand():
    from halo_balance.cli import COMMANDS

    rows = dict(re.findall(r"^\| `halo-balance ([\w-]+)` \| `python -m ([\w.]+)` \|$", README, flags=re.M))
    assert rows == COMMANDS
