"""The aligned demo model: SmolLM2-135M-Instruct safety-aligned with the shipped ``demo`` recipe.

``load_model("demo")`` builds it on first use (about 10 minutes on two CPU cores) and caches
it in ``cache_dir()/models/demo``; the package registers this builder under the name ``demo``.
The recipe is ``recipes/demo.yaml``; why each of its values, and how it came to be, is in
docs/demo-recipe.md.
"""

from __future__ import annotations

from pathlib import Path

from ..align.config import AlignConfig
from ..align.run import align, read_manifest
from ..core.models import cache_dir

#: Bumped whenever the demo recipe changes the weights, so a cached demo model of an older recipe is rebuilt.
DEMO_VERSION = 6


def demo_config(out: str | Path | None = None) -> AlignConfig:
    """The demo recipe (``recipes/demo.yaml``) aimed at ``out`` (default: the cached demo folder)."""
    return AlignConfig(recipe="demo", out=str(out or demo_folder()), overwrite=True)


def demo_folder() -> Path:
    return cache_dir() / "models" / "demo"


def build_demo(progress: bool = True, rebuild: bool = False) -> Path:
    """The aligned demo model's folder, built from the bundled model on first use.

    The first call aligns SmolLM2-135M-Instruct with :func:`demo_config` (about 10 minutes
    on two CPU cores) and caches it in ``cache_dir()/models/demo``; later calls return the
    folder at once. A folder built by an older recipe version is rebuilt.
    """
    folder = demo_folder()
    manifest = read_manifest(folder) if (folder / "config.json").is_file() else None
    if manifest is not None and manifest.get("demo_version") == DEMO_VERSION and not rebuild:
        return folder
    from rich.console import Console

    Console(stderr=True).print(f"[dim]building the aligned demo model into {folder} (once; about 10 minutes "
                               "on 2 CPU cores)[/dim]")
    cfg = demo_config(folder)
    cfg.progress = progress
    result = align(cfg, manifest={"demo_version": DEMO_VERSION})
    mal = result.refusal.get("heldout_malicious", {}).get("rate")
    ben = result.refusal.get("heldout_benign", {}).get("rate")
    if mal is not None:
        Console(stderr=True).print(f"[dim]demo model ready in {result.seconds['total']:.0f} s: refuses {mal:.1%} of "
                                   f"held-out malicious and {ben:.1%} of held-out benign prompts[/dim]")
    return folder
