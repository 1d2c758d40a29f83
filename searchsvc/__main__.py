"""`python -m searchsvc` and the `searchsvc` console script (pyproject: searchsvc.__main__:entry)."""

import sys


def entry() -> int:
    """Import the CLI, then run it: Ctrl-C while the imports load (about a second) is the same one line as
    Ctrl-C later, not a traceback."""
    try:
        from searchsvc.cli import main
    except KeyboardInterrupt:
        print("searchsvc: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(entry())
