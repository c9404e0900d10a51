"""``safety-layers plan``: parameters, frozen fraction and memory per stage, from a model's config alone."""

from __future__ import annotations


def run_plan(cfg) -> int:
    import json

    from ..finetune.plan import plan_memory, plan_text

    p = plan_memory(cfg)
    print(json.dumps(p.to_dict(), indent=2) if cfg.json else plan_text(p))
    return 0
