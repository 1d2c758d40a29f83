"""Errors a user can cause. The base class lives in the bottom layer so every layer can raise it.

The CLI turns any `SearchsvcError` into one line on stderr and exit code 2 (a subclass may carry another
`exit_code`: an infrastructure fault's RunFailed exits 75, the run resumable); anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class SearchsvcError(Exception):
    """An error caused by the user's input or environment; its message names the key or path."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (at most `limit` characters), or its type's name if it has none:
    what a one-line report of someone else's exception shows."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
