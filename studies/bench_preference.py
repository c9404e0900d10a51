"""Experiment: does a DPO step after SFT move the demo model off its refusal trade-off?

    python studies/bench_preference.py                          # DPO, lr 1e-5, beta 0.1
    python studies/bench_preference.py --lr 2e-5 --nll 1.0      # DPO + NLL on the chosen reply (RPO)
    python studies/bench_preference.py --start /tmp/other-sft   # on another SFT model

Every SFT recipe tried for issue 4 lies on one curve: more held-out malicious refusal comes
with more held-out benign refusal. SFT only pulls towards good replies; a preference step
also pushes away from bad ones, which could break that coupling. The pairs, off-policy and
built from the training splits only (held-out prompts never enter):

- malicious prompt: chosen = a written refusal for its category, rejected = the bare
  model's own greedy answer (prompts the bare model already refuses are skipped);
- benign prompt: chosen = the bare model's greedy answer, rejected = a written refusal.

The reference model is the starting SFT model; its log-probabilities are computed once. The
bare model's answers are cached in --work (they are harmful text: kept in files, never printed).
Refusal is measured as in bench_align.py (keyword judge, opening mode, 48 greedy tokens) on the
held-out splits and the built-in over-rejection set, and written to --work/<tag>.json.

Measured on the v3 demo model (81.5 / 11.8 / 17.7% held-out malicious / held-out benign /
over-rejection), 136 malicious + 155 benign pairs, 37 steps: plain DPO at lr 1e-5 gave
76.9 / 9.1 / 21.0% (this script, seed 7) and 68.5 / 5.5 / 14.4% (same pairs, another batch
order); with NLL 1.0 at lr 2e-5, 73.1 / 6.4 / 16.5%. Every point lies on the SFT recipes'
curve within the ±8 points that 108 prompts and batch order allow.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_layers.recipes.demo_model import build_demo, demo_config  # noqa: E402
from safety_layers.align.data import (Example, _bundled, _sources, encode_example,  # noqa: E402
                                      load_records, refusal_pool)
from safety_layers.align.run import refusal_rate  # noqa: E402
from safety_layers.finetune.data import PadCollator  # noqa: E402
from safety_layers.core.data import load_prompts  # noqa: E402
from safety_layers.engine.generation import GenerationSettings, generate  # noqa: E402
from safety_layers.core.models import load_model  # noqa: E402
from safety_layers.judges import get_judge  # noqa: E402


def bare_answers(rows_mal, rows_ben, tokens: int, path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    bare = load_model("smollm2-135m-instruct")
    s = GenerationSettings(max_new_tokens=tokens)
    out = {kind: [[c.text.strip(), c.finished] for c in generate(bare, [r["prompt"] for r in rows], s, progress=False)]
           for kind, rows in (("malicious", rows_mal), ("benign", rows_ben))}
    path.write_text(json.dumps(out))
    return out


def make_pairs(rows_mal, rows_ben, answers: dict, rng: random.Random) -> list[tuple[Example, Example, str]]:
    judge = get_judge("keyword")
    refusals = load_records(_bundled("refusals"), ("text", "categories"))
    pairs = []
    for r, (text, done) in zip(rows_mal, answers["malicious"]):
        if judge.judge([r["prompt"]], [text])[0].refused:
            continue
        chosen = rng.choice(refusal_pool(refusals, r["category"], r.get("topic")))
        pairs.append((Example(r["prompt"], chosen, "refusal"), Example(r["prompt"], text, "compliance", finished=done),
                      "malicious"))
    for r, (text, done) in zip(rows_ben, answers["benign"]):
        if judge.judge([r["prompt"]], [text])[0].refused:
            continue
        rejected = rng.choice(refusal_pool(refusals, "any", None))
        pairs.append((Example(r["prompt"], text, "benign", finished=done), Example(r["prompt"], rejected, "refusal"),
                      "benign"))
    return pairs


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and how many there are."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    lp = torch.log_softmax(logits, -1).gather(-1, labels[keep][:, None])[:, 0]
    return torch.zeros(labels.shape[0]).index_add(0, keep.nonzero()[:, 0], lp), keep.sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", default=None, help="SFT model folder (default: the demo model)")
    ap.add_argument("--k", type=int, default=160, help="prompts sampled per kind (malicious, benign)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--nll", type=float, default=0.0, help="weight of the chosen reply's mean NLL (0: plain DPO)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--tokens", type=int, default=32, help="length of the bare model's answers")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default="/tmp/safety-layers-preference")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    tag = a.tag or f"dpo-lr{a.lr:g}-beta{a.beta:g}-nll{a.nll:g}"
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)

    cfg = demo_config()
    mal_rows, held_mal, _ = _sources(cfg, "malicious")
    held_mal = [r["prompt"] for r in held_mal]
    ben_rows, held_ben, _ = _sources(cfg, "benign")
    held_ben = [r["prompt"] for r in held_ben]
    mal, ben = rng.sample(mal_rows, a.k), rng.sample(ben_rows, a.k)
    t = time.perf_counter()
    answers = bare_answers(mal, ben, a.tokens, work / f"bare-answers-{a.seed}-{a.k}-{a.tokens}.json")
    pairs = make_pairs(mal, ben, answers, rng)
    n_mal = sum(p[2] == "malicious" for p in pairs)
    print(f"pairs: {n_mal} malicious, {len(pairs) - n_mal} benign ({time.perf_counter() - t:.0f} s)", flush=True)

    lm = load_model(a.start or str(build_demo()))
    tok, model = lm.tokenizer, lm.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [(encode_example(tok, c, "chat", 128), encode_example(tok, r, "chat", 128)) for c, r, _ in pairs]

    t = time.perf_counter()
    model.eval()
    ref = []
    with torch.no_grad():
        for i in range(0, len(enc), 16):
            chunk = enc[i:i + 16]
            batch = PadCollator(pad, multiple=1)([c for c, _ in chunk] + [r for _, r in chunk])
            ref.append(sequence_logps(model, batch)[0].view(2, -1).T)
    ref = torch.cat(ref)
    t_ref = time.perf_counter() - t

    steps = math.ceil(a.epochs * math.ceil(len(enc) / a.batch_size))
    warm = math.ceil(0.1 * steps)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (steps - k) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(a.seed)
    plan = []
    while len(plan) < steps:
        perm = torch.randperm(len(enc), generator=gen).tolist()
        plan += [perm[j:j + a.batch_size] for j in range(0, len(perm), a.batch_size)]
    model.train()
    t = time.perf_counter()
    for k, idx in enumerate(plan[:steps]):
        batch = PadCollator(pad, multiple=1)([enc[i][0] for i in idx] + [enc[i][1] for i in idx])
        lp, n = sequence_logps(model, batch)
        lp, n = lp.view(2, -1), n.view(2, -1)
        margin = a.beta * ((lp[0] - ref[idx, 0]) - (lp[1] - ref[idx, 1]))
        loss = -F.logsigmoid(margin).mean() + a.nll * (-lp[0] / n[0]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if k % 5 == 0 or k == steps - 1:
            print(f"step {k + 1}/{steps} loss {loss.item():.3f} pairs ordered {(margin > 0).float().mean():.2f}",
                  flush=True)
    t_train = time.perf_counter() - t

    model.eval()
    result = {"args": vars(a), "pairs": {"malicious": n_mal, "benign": len(pairs) - n_mal},
              "seconds": {"reference": round(t_ref), "train": round(t_train)}, "refusal": {}}
    for name, prompts in (("heldout_malicious", held_mal), ("heldout_benign", held_ben),
                          ("over_rejection", load_prompts("over-rejection").prompts)):
        result["refusal"][name] = refusal_rate(lm, prompts, 48, "chat", False)
    (work / f"{tag}.json").write_text(json.dumps(result, indent=2))
    print(" / ".join(f"{k} {v['rate']:.1%} ({v['refused']}/{v['n']})" for k, v in result["refusal"].items()))


if __name__ == "__main__":
    main()
