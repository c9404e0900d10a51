"""The data the baselines bring with them: refusals to malicious prompts (the safety data of
NFFT's scores, Lisa's alignment state, the rejected replies of reverse DPO) and benign
answers (NFFT's utility data).

By default both come from the package's own alignment data (``safety_layers/data/align``):
its malicious training prompts paired with the bundled refusals, and its benign training
prompts. None of them is among the held-out or AdvBench prompts the harmful rate is
measured on. Users pass their own files instead (``alignment_data``: prompt/response rows;
``nfft_utility``: instruction/output rows).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..core.errors import SafetyLayersError


def alignment_examples(path: str | None, n: int | None = None, seed: int = 0) -> list:
    """Malicious prompts with refusals as align :class:`~safety_layers.align.Example` rows.

    ``path``: a file of ``prompt``/``response`` rows; None: the bundled malicious prompts, each
    with a refusal of its category (seeded). ``n`` keeps a seeded sample of that many.
    """
    from ..align.data import Example, _bundled, load_records, refusal_examples

    rng = random.Random(f"{seed}-alignment")
    if path is None:
        rows = refusal_examples(load_records(_bundled("malicious"), ("prompt",)),
                                load_records(_bundled("refusals"), ("text", "categories")), rng)
    else:
        if not Path(path).is_file():
            raise SafetyLayersError(f"alignment data {path} does not exist: pass a JSONL file of prompt/response "
                                    "refusal pairs, or leave alignment_data unset for the bundled ones")
        rows = [Example(r["prompt"], r["response"], "refusal") for r in load_records(path, ("prompt", "response"))]
    if not rows:
        raise SafetyLayersError(f"alignment data {path or 'bundled'} has no rows: it needs prompt/response pairs")
    return rng.sample(rows, n) if n is not None and n < len(rows) else rows


def benign_prompts(n: int, seed: int = 0) -> list[str]:
    """A seeded sample of ``n`` of the bundled benign training prompts."""
    from ..align.data import _bundled, load_records

    rows = [r["prompt"] for r in load_records(_bundled("benign"), ("prompt",))]
    return random.Random(f"{seed}-benign").sample(rows, min(n, len(rows)))


def encode_examples(tokenizer, examples: list, template: str, max_length: int) -> list:
    """Token ids with the loss on each reply (align's rule); examples that do not fit are dropped."""
    from ..align.data import encode_example

    out = [encode_example(tokenizer, ex, template, max_length) for ex in examples]
    return [e for e in out if e is not None]
