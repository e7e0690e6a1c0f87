"""Which source wrote a result: the commit of a checkout, marked when its tracked files were edited."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from prance.source import EDITED, commit_of, short

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_commit_of_names_head_and_marks_edits_of_tracked_files_only(tmp_path: Path) -> None:
    assert commit_of(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    (repo / "notes.md").write_text("notes\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = _git(repo, "rev-parse", "HEAD")

    assert commit_of(repo / "pkg") == head
    (repo / "pkg" / "new.py").write_text("y = 2\n")  # untracked: not part of the source that ran
    (repo / "notes.md").write_text("edited outside the package\n")
    assert commit_of(repo / "pkg") == head
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert commit_of(repo / "pkg") == head + EDITED
    assert short(head + EDITED) == head[:12] + EDITED and short(head) == head[:12] and short(None) == "unknown"
