"""Which prance source wrote a result: the git commit of the package, marked when it was edited.

Reports, comparisons and each stage of a run record it, so a number can be traced to the code
that produced it, also when several runs were made from different checkouts.
"""

from __future__ import annotations

import os
import subprocess
from functools import lru_cache
from pathlib import Path

#: Appended to the commit when the package's tracked files differ from it.
EDITED = "+edits"


@lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The commit of this package's source (:func:`commit_of`); None for an installed wheel."""
    return commit_of(Path(__file__).resolve().parent)


def commit_of(folder: str | os.PathLike[str]) -> str | None:
    """``HEAD`` of the git checkout holding ``folder``, with :data:`EDITED` appended when tracked
    files under ``folder`` differ from it (new untracked files do not count); None outside git."""
    head = _git(Path(folder), "rev-parse", "HEAD")
    if not head:
        return None
    edited = _git(Path(folder), "status", "--porcelain", "--untracked-files=no", "--", ".")
    return head + (EDITED if edited else "")


def short(commit: str | None) -> str:
    """``commit`` as people quote it: 12 hex digits and the edit mark, or "unknown"."""
    if not commit:
        return "unknown"
    return commit[:12] + (EDITED if commit.endswith(EDITED) else "")


def _git(where: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


__all__ = ["EDITED", "commit_of", "short", "source_commit"]
