"""Errors a user can cause. The base class lives in the bottom layer so every layer can raise it.

The CLI turns any `SearchsvcError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SearchsvcError(Exception):
    """An error caused by the user's input or environment; its message names the key or path."""
