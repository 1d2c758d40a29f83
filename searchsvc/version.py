"""The code version recorded with every result: the git commit when run from a checkout, else the package's."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

# Outputs, not code: a benchmark's JSON written into the checkout must not mark the next one's code as
# modified (every JSON of a `make bench` run after the first used to say "-dirty").
NOT_CODE = ("benchmarks/results",)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The commit of the checkout holding this package (12 hex digits), "-dirty" when its code differs from
    that commit (benchmark results aside), or the installed package's version."""
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            commit = _git(root, "rev-parse", "--short=12", "HEAD")
            changed = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                           *(f":(exclude){path}" for path in NOT_CODE))
            return commit + ("-dirty" if changed else "")
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return metadata.version("searchsvc")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True)
    return out.stdout.strip()
