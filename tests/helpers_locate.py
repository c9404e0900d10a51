"""Tiny models that "refuse", a judge they can satisfy, and the torchrun worker of tests/test_locate.py.

A random tiny model never writes "I'm sorry", so the keyword judge would count nothing. Here a
reply "refuses" when it opens with one of the first tokens the first-token proxy sums
(``A I M S U`` with the byte tokenizer: the first letters of the refusal openings), and the
model's LM-head rows of those tokens are boosted so that greedy decoding opens with them for
part of the prompts. Scaling a band of layers then moves the count, as it does on a real model.

``helpers_locate.py OUT`` (the worker): run ``locate`` on the tiny model on this
process's shard and dump the result to ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from conftest import tiny_model
from safety_layers.judges import Judge, Verdict, register_judge

REFUSAL_LETTERS = "AIMSU"


@register_judge("first-letter")
class FirstLetterJudge(Judge):
    """Refused iff the completion opens with one of :data:`REFUSAL_LETTERS`."""

    def _judge(self, prompts, completions):
        return [Verdict(refused=c[:1] in REFUSAL_LETTERS and c[:1] != "") for c in completions]


def refusing_tiny_model(seed: int = 1, layers: int = 8, boost: float = 3.0):
    """A seeded tiny llama whose LM head favours the refusal-opening first tokens by ``boost``."""
    from safety_layers.judges.proxy import opening_token_ids

    lm = tiny_model("llama", layers=layers, seed=seed)
    ids = sorted(opening_token_ids(lm.tokenizer))
    with torch.no_grad():
        lm.model.get_output_embeddings().weight[ids] *= boost
    return lm


def tiny_config(**overrides):
    """The LocateConfig the tests share: built-in sets cut to 16 prompts, 4 new tokens."""
    from safety_layers.locate import LocateConfig

    base = dict(model="tiny", init="3-5", alpha=1.1, window=2, limit=16, max_new_tokens=4, judge="first-letter",
                progress=False)
    base.update(overrides)
    return LocateConfig(**base)


def main(out: str) -> None:
    from safety_layers.engine import distributed
    from safety_layers.locate import locate
    from safety_layers.core.runs import to_jsonable

    torch.set_num_threads(1)
    w = distributed.world()
    out_dir = Path(out)
    result = locate(tiny_config(), model=refusing_tiny_model(), run_dir=out_dir / f"run-rank{w.rank}")
    (out_dir / f"rank{w.rank}.json").write_text(json.dumps({"rank": w.rank, "world": w.size,
                                                            "result": to_jsonable(result)}))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
