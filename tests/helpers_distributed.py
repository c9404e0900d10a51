"""The worker that tests/test_distributed.py launches with ``python -m torch.distributed.run``.

``helpers_distributed.py MODEL_DIR PROMPTS_FILE OUT`` on every rank: load the saved tiny model,
generate for the prompts sharded across ranks (gathered in input order), then run
``evaluate`` with a run folder per rank (only rank 0 may write one) and dump what this rank
got to ``OUT/rank<r>.json`` for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from safety_layers.engine import distributed
from safety_layers.core.errors import SafetyLayersError
from safety_layers.evaluate.run import EvaluateConfig, evaluate, generate_all
from safety_layers.engine.generation import GenerationSettings
from safety_layers.core.models import load_model


def main(model_dir: str, prompts_file: str, out: str) -> None:
    torch.set_num_threads(1)
    w = distributed.world()
    out_dir = Path(out)
    lm = load_model(model_dir)
    prompts = Path(prompts_file).read_text().splitlines()
    comps = generate_all(lm, prompts, GenerationSettings(max_new_tokens=8), progress=False)
    cfg = EvaluateConfig(model=model_dir, malicious=prompts_file, over_rejection=None, judges="keyword,keyword-gcg",
                         max_new_tokens=8, progress=False)
    result = evaluate(cfg, model=lm, run_dir=out_dir / f"run-rank{w.rank}")

    def fail():
        raise SafetyLayersError("judge down on rank 0")

    try:
        distributed.run_on_main(fail)
        error = None
    except SafetyLayersError as err:  # every rank must get rank 0's error instead of waiting forever
        error = str(err)
    (out_dir / f"rank{w.rank}.json").write_text(json.dumps({
        "rank": w.rank, "world": w.size, "texts": [c.text for c in comps],
        "evaluate_texts": [c.text for c in result.harmful.completions],
        "evaluate_cached": [c.cached for c in result.harmful.completions],
        "result": result.to_dict(), "error": error}))
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
