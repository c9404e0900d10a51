"""Recipes of this package's own: the aligned demo model and the demo pipeline."""
