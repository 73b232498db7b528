"""Shared tools of the bad-input catalogue (docs/reliability.md).

Each case runs the `argen` command in this process (`argen.cli.main.main`, so 60+ cases stay
fast) or calls the Python API, inside a working folder full of the user's own files, and checks
three things: the exit code (2 for every error a user can cause), a single-line message with no
traceback, and that every file around is byte-for-byte and mode-for-mode unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from argen.cli.main import main


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def cli(*args) -> Outcome:
    """Run `argen ARGS` in this process; an exception escaping `main` fails the test (a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse --help/--version
            code = exc.code
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_refused(outcome: Outcome, *fragments: str) -> None:
    """Exit 2, one line on stderr starting 'argen', no traceback, and the message names what is wrong."""
    assert outcome.code == 2, (outcome.code, outcome.err)
    lines = [line for line in outcome.err.splitlines() if line.strip()]
    assert len(lines) == 1, outcome.err
    assert "Traceback" not in outcome.err and lines[0].startswith("argen"), outcome.err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def snapshot(root: Path) -> dict:
    """{relative path: (kind, mode, sha256)} of everything under root, hidden files included."""
    state = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_dir():
            state[rel] = ("dir", st.st_mode, None)
        else:
            state[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return state


@pytest.fixture
def userdir(tmp_path, monkeypatch):
    """A working folder holding the user's own files (including the names argen likes to use),
    made the current directory. After the test, nothing in it may have changed."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photo.png").write_bytes(b"not argen's")
    (tmp_path / "out.png").write_bytes(b"a png of the user's")
    (tmp_path / "results.json").write_text('{"mine": true}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.csv").write_text("my,own,log\n")
    (tmp_path / "run" / "model").mkdir()
    (tmp_path / "run" / "model" / "MY_NOTES.md").write_text("keep me\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    yield tmp_path
    assert snapshot(tmp_path) == before, "a refused command changed the user's files"
