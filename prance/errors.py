"""One exception type for every user-facing failure.

The CLI turns a :class:`PranceError` into a single line (problem + fix) and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PranceError(Exception):
    """A problem the user can fix: bad input, missing data, invalid plan or config.

    The message should name the problem and say how to fix it, in one line.
    """

    exit_code: int = 2
