"""Model aliases that are built on first use (e.g. the aligned demo model).

``BUILDERS`` maps an alias to a function that returns the path of a ready Hugging Face
folder, building and caching it if needed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

BUILDERS: dict[str, Callable[[], Path]] = {}
