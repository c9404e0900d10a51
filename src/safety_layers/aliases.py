"""Model aliases that are built on first use (e.g. the aligned demo model).

``BUILDERS`` maps an alias to a function that returns the path of a ready Hugging Face
folder, building and caching it if needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _demo() -> Path:
    from .align import build_demo  # imported on use: training code is not needed to resolve names

    return build_demo()


BUILDERS: dict[str, Callable[[], Path]] = {"demo": _demo}
