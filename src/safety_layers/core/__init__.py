"""Core: what every step builds on, with no step's logic in it.

The architecture map and model loading (:mod:`.models`), layer ranges (:mod:`.layers`),
prompt templates (:mod:`.prompts`), prompt sets and data files (:mod:`.data`), in-place
scaling of a band (:mod:`.scaling`), statistics (:mod:`.stats`) and run folders
(:mod:`.runs`). Nothing here imports from the engine, the steps or the application.
"""
