"""Core: what every step builds on, with no step's logic in it.

The architecture map and model loading (:mod:`.models`), layer ranges (:mod:`.layers`),
prompt templates (:mod:`.prompts`), prompt sets and data files (:mod:`.data`), in-place
scaling of a band (:mod:`.scaling`), statistics (:mod:`.stats`), run folders and JSON files
(:mod:`.runs`), settings dataclasses and YAML (:mod:`.config`), pick-by-name registries
(:mod:`.registry`) and the one error type users see (:mod:`.errors`). Nothing here imports
from the engine, the steps or the application.
"""

#: The package version (read by pyproject.toml and written into every run's env.json).
__version__ = "0.1.0"
