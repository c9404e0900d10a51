"""Fixtures shared by the command-line tests that run the real bundled model.

Import both names into a test module: ``from helpers_cli import no_demo_build, private_cache``.
"""

from __future__ import annotations

import pytest
import torch

from safety_layers.core.models import DEFAULT_MODEL, cache_dir
from safety_layers.core.registry import BUILT_MODELS


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    """A fresh cache that reuses the user's converted bare model; one torch thread (the machine is shared)."""
    real = cache_dir() / "models" / DEFAULT_MODEL
    root = tmp_path_factory.mktemp("cache")
    if (real / "config.json").is_file():
        (root / "models").mkdir()
        (root / "models" / DEFAULT_MODEL).symlink_to(real, target_is_directory=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETY_LAYERS_CACHE", str(root))
        mp.setenv("COLUMNS", "250")        # rich does not wrap, so a leaked completion would show whole
        yield root
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_demo_build(private_cache, monkeypatch):
    """Building the 'demo' model fails loudly: tests name the bundled model."""
    def refuse():
        raise AssertionError("a test reached the 'demo' alias: pass --model smollm2-135m-instruct")

    monkeypatch.setitem(BUILT_MODELS._entries, "demo", refuse)
