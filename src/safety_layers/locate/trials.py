"""Counting refusals on the model, one trial at a time, journaled so a rerun evaluates nothing twice.

A trial is one (prompt set, range, alpha, method) on the model: the band scaled in place
(:func:`core.scaling.scaled_layers`, restored bit-identically, also on error) and the set
counted either by generation + judge (``generation``) or by the first-token refusal proxy
(``proxy``: one batched forward pass per prompt, no decoding), whose threshold is calibrated
against generation + judge on the unscaled model.

Every trial is appended to ``trials.jsonl`` the moment it is known (keyed by set, range,
alpha and method, plus a hash of everything that affects it), with the per-prompt verdicts
or proxy scores. Under ``torchrun`` or ``accelerate launch`` each trial's prompts are sharded
across processes; rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.runs import append_jsonl, atomic_write, read_jsonl
from ..core.scaling import scaled_layers
from ..engine.distributed import broadcast_from_main, map_sharded, run_on_main, world

PROXY_RULE = ("proxy threshold: balanced-accuracy threshold on first-token refusal mass vs generation + judge, "
              "unscaled model, over-rejection and malicious prompts pooled")


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (what a journal record was computed with)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trial_key(which: str, rng: LayerRange | None, alpha: float, method: str, setup: str) -> tuple:
    return (which, None if rng is None else (rng.start, rng.end), round(float(alpha), 6), method, setup)


class Journal:
    """``trials.jsonl``: one line per evaluated (set, range, alpha, method), read back on a rerun.

    A record counts only for the same ``setup`` (a hash of the model fingerprint, the prompts,
    template, components, judge and generation length), so a rerun with other settings in the
    same folder evaluates afresh instead of reusing counts that no longer apply.
    """

    def __init__(self, path: Path | None, w=None):
        self.path, self.w = path, w or world()
        records = (read_jsonl(path) if path is not None else []) if self.w.is_main else None
        self.records: dict[tuple, dict] = {}
        for rec in broadcast_from_main(records, self.w) or []:
            try:
                rng = None if rec["range"] is None else LayerRange.parse(rec["range"])
                self.records[trial_key(rec["set"], rng, rec["alpha"], rec["method"], rec["setup"])] = rec
            except (KeyError, TypeError, ValueError, SafetyLayersError):
                continue

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def add(self, key: tuple, record: dict) -> None:
        self.records[key] = record
        if self.path is not None and self.w.is_main:
            append_jsonl(self.path, record)


class Evaluator:
    """Counts refusals of the prompt ``sets`` on the model with a band scaled, journaled and sharded.

    ``refusals`` (generation + judge) returns per-prompt verdicts, ``scores`` (first-token
    proxy) per-prompt refusal mass; both are read from the journal when present. ``fresh``
    counts the evaluations actually run, by method; ``reused`` the keys read from an earlier
    run's journal.
    """

    def __init__(self, lm, sets: dict, judge, journal: Journal, *, template: str, components: str,
                 max_new_tokens: int, batch_size: int | None, cache: bool, bar=None, w=None):
        from ..core.prompts import resolve_template
        from ..engine.generation import GenerationSettings

        self.lm, self.sets, self.judge, self.journal, self.bar = lm, sets, judge, journal, bar
        self.w = w or world()
        self.template_arg, self.components, self.batch_size, self.cache = template, components, batch_size, cache
        self.template = resolve_template(lm.tokenizer, template)
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.proxy = None
        self.threshold: float | None = None
        self.fresh = {"proxy": 0, "generation": 0}
        self.loaded = set(journal.records)  # read from an earlier run's journal
        self.reused: set[tuple] = set()
        self.seconds = {"proxy": 0.0, "generation": 0.0}
        base = {"model": lm.fingerprint(), "template": self.template, "components": components}
        self.setups = {}
        for which, ps in sets.items():
            common = {**base, "prompts": digest(ps.prompts)}
            self.setups[(which, "generation")] = digest({**common, "judge": judge.config(),
                                                         "max_new_tokens": max_new_tokens})
            self.setups[(which, "proxy")] = digest({**common, "proxy": "first-token-v1"})
        self.texts: dict[tuple, list[str]] = {}

    def first_token_proxy(self):
        if self.proxy is None:
            from ..judges.proxy import FirstTokenProxy

            self.proxy = FirstTokenProxy(self.lm, template=self.template_arg, batch_size=self.batch_size or 128)
        return self.proxy

    def key(self, which: str, rng: LayerRange | None, alpha: float, method: str) -> tuple:
        return trial_key(which, rng, alpha if rng is not None else 1.0, method, self.setups[(which, method)])

    def _run(self, which, rng, alpha, method, compute) -> dict:
        key = self.key(which, rng, alpha, method)
        rec = self.journal.get(key)
        if rec is not None:
            if key in self.loaded:
                self.reused.add(key)
            return rec
        if self.bar is not None:
            self.bar.set_postfix_str(f"{which} {rng or 'unscaled'} x{alpha:g} {method}")
        t = time.perf_counter()
        if rng is None:
            data = compute()
        else:
            with scaled_layers(self.lm, rng, alpha, self.components):
                data = compute()
        sec = time.perf_counter() - t
        self.seconds[method] += sec
        self.fresh[method] += 1
        n = len(self.sets[which].prompts)
        rec = {"set": which, "range": None if rng is None else [rng.start, rng.end], "alpha": key[2],
               "method": method, "n": n, "seconds": round(sec, 3), "setup": key[4], **data}
        self.journal.add(key, rec)
        if self.bar is not None:
            self.bar.update(1)
        return rec

    def refusals(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> list[bool]:
        """Per-prompt refused verdicts of generation + judge."""
        rec = self._run(which, rng, alpha, "generation", lambda: self._generate_and_judge(which, rng, alpha))
        return [c == "1" for c in rec["refused"]]

    def _generate_and_judge(self, which: str, rng: LayerRange | None, alpha: float) -> dict:
        from ..engine.generation import generate_all

        prompts = self.sets[which].prompts
        comps = generate_all(self.lm, prompts, self.settings, template=self.template_arg, cache=self.cache,
                             progress=False)
        texts = [c.text for c in comps]
        self.texts[self.key(which, rng, alpha, "generation")] = texts
        refused = run_on_main(lambda: [bool(v.refused and not v.error) for v in self.judge.judge(prompts, texts)],
                              self.w)
        return {"count": sum(refused), "refused": "".join("1" if r else "0" for r in refused)}

    def count(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> int:
        return sum(self.refusals(which, rng, alpha))

    def scores(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> np.ndarray:
        """Per-prompt first-token refusal mass."""
        rec = self._run(which, rng, alpha, "proxy", lambda: self._proxy_scores(which))
        return np.asarray(rec["scores"], dtype=np.float64)

    def _proxy_scores(self, which: str) -> dict:
        proxy = self.first_token_proxy()
        s = map_sharded(lambda shard: proxy.scores(shard).tolist(), self.sets[which].prompts, self.w)
        thr = self.threshold  # None while calibrating; counts are always recomputed from the scores
        return {"count": None if thr is None else int(sum(x >= thr for x in s)), "threshold": thr, "scores": s}

    def proxy_count(self, which: str, rng: LayerRange | None, alpha: float = 1.0) -> int:
        if self.threshold is None:
            raise RuntimeError("proxy threshold not calibrated")
        return int((self.scores(which, rng, alpha) >= self.threshold).sum())

    def counter(self, method: str, alpha: float):
        """``range -> count`` of the over-rejection set at ``alpha`` by ``method`` (a sweep's screen or confirm)."""
        count = self.proxy_count if method == "proxy" else self.count
        return lambda rng: count("over-rejection", rng, alpha)

    def journal_counts(self, which: str, method: str) -> dict[tuple, int]:
        """(range, alpha) -> count of every journaled trial of this set and method (current setup)."""
        setup = self.setups[(which, method)]
        out = {}
        for key, rec in self.journal.records.items():
            if key[0] == which and key[3] == method and key[4] == setup:
                if method == "proxy":
                    out[(key[1], key[2])] = int((np.asarray(rec["scores"]) >= self.threshold).sum())
                else:
                    out[(key[1], key[2])] = int(rec["count"])
        return out


def calibrate(ev: Evaluator, sets: list[str], notes: list[str]) -> dict:
    """Threshold of the first-token proxy against generation + judge on the unscaled model, pooled over ``sets``.

    Sets ``ev.threshold``; ``used`` is False (with a note) when the model refuses none or all
    of the calibration prompts, so no threshold separates them.
    """
    from ..judges.proxy import choose_threshold

    scores = np.concatenate([ev.scores(s, None) for s in sets])
    refused = [r for s in sets for r in ev.refusals(s, None)]
    n_ref = sum(refused)
    info = {"calibrated_on": sets, "n": len(refused), "n_refused": n_ref, "tokens": ev.first_token_proxy().tokens,
            "rule": PROXY_RULE}
    if n_ref == 0 or n_ref == len(refused):
        notes.append(f"the unscaled model refuses {n_ref} of the {len(refused)} calibration prompts "
                     f"({' + '.join(sets)}), so the first-token proxy cannot be calibrated: every candidate is "
                     "counted by generation + judge")
        return {**info, "threshold": None, "used": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = choose_threshold(scores, refused)
    ev.threshold = cal.threshold
    return {**info, "threshold": cal.threshold, "balanced_accuracy": cal.value, "agreement": cal.agreement,
            "used": True}


def write_samples(ev: Evaluator, path: Path, wanted: list[tuple]) -> None:
    """Every prompt's completion and verdict of the ``(set, range, alpha)`` trials in ``wanted``, as JSONL.

    Texts are taken from this run's memory, or on a resumed run generated again (greedy, so the
    same texts; through the generation cache unless it is off), so the file is whole either way.
    """
    from ..engine.generation import generate

    lines = []
    for which, rng, a in wanted:
        prompts = ev.sets[which].prompts
        texts = ev.texts.get(ev.key(which, rng, a, "generation"))
        if texts is None:          # a resumed run: generated again (greedy), from the cache when it is on
            with scaled_layers(ev.lm, rng, a, ev.components) if rng is not None else contextlib.nullcontext():
                texts = [c.text for c in generate(ev.lm, prompts, ev.settings, template=ev.template_arg,
                                                  cache=ev.cache, progress=False)]
        refused = ev.refusals(which, rng, a)
        for p, text, r in zip(prompts, texts, refused):
            lines.append(json.dumps({"set": which, "range": None if rng is None else [rng.start, rng.end],
                                     "alpha": a if rng is not None else 1.0, "prompt": p, "completion": text,
                                     "refused": r}, ensure_ascii=False))
    atomic_write(path, "".join(line + "\n" for line in lines))
