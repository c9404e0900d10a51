"""The aligned demo model: SmolLM2-135M-Instruct safety-aligned with :func:`demo_config`.

``load_model("demo")`` builds it on first use (about 10 minutes on two CPU cores) and caches
it in ``cache_dir()/models/demo``; the package registers this builder under the name ``demo``.
"""

from __future__ import annotations

from pathlib import Path

from ..align.run import AlignConfig, align, read_manifest
from ..core.models import cache_dir

#: Bumped whenever :func:`demo_config` changes, so a cached demo model of an older recipe is rebuilt.
DEMO_VERSION = 6


def demo_config(out: str | Path | None = None) -> AlignConfig:
    """The recipe of the aligned demo model (see the module docstring and bench/bench_align.py).

    Chosen on the held-out splits and on robustness to the implicit attack: 300 refusals +
    99 recovery examples against 600 self-distilled answers (benign prompts the base model
    refuses answered again with a helpful opening) weighted 0.6, two epochs at lr 1e-4, the
    first 4 reply tokens weighted 4x. v4 trained one epoch and still refused only 93% of its
    own malicious training prompts; a second epoch raised held-out malicious refusal from 84%
    to 89% (seed 0), and the recovery examples kept 81% instead of 50-52% through the
    implicit attack at lr 2e-5 (v5). v6 trains on the bundled refusals that all open with
    "Sorry", a word no benign answer starts with, so refusing is one decision at the first
    reply token: held-out benign refusal fell from 9% to 4% (seed 0) and from 8% to 3%
    (seed 1) at the same malicious refusal, which left room to weigh the benign answers less.
    """
    return AlignConfig(model="smollm2-135m-instruct", out=str(out or demo_folder()), overwrite=True,
                       method="full", n_malicious=300, recovery_fraction=0.33, n_benign=600, answer_tokens=32,
                       epochs=2.0, lr=1e-4, opening_weight=4.0, benign_weight=0.6, reopen=True, seed=0)


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
