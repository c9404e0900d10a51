"""NFFT, neuron-freezing fine-tuning: the paper's baseline that freezes Wei et al.'s
safety-critical weights instead of a band of layers (Table 2, spec §4.4).

Wei et al. 2024 ("Assessing the brittleness of safety alignment via pruning and low-rank
modifications", §3) score every entry of every attention and MLP matrix with SNIP,
``I(W) = |W * dL/dW|``, summed over examples, once on safety data (refusals to malicious
prompts) and once on utility data (benign answers). The safety-critical entries are those
high on safety that are not among the top-p entries on utility (a set difference, p taken
per matrix). The paper freezes them "in the same proportion of parameters as SPPFT freezes",
so here exactly as many entries as the band holds are frozen: the highest safety scores
outside each matrix's utility top-p (p defaults to that proportion, q = p as in Wei et al.'s
``p = q`` runs). A band that holds more entries than are left outside the utility top-p
cannot be matched and is refused.

Freezing is per entry, so it goes through gradient masks: a hook zeroes the gradient of the
frozen entries (so Adam's moments for them stay exactly zero and the update is zero), and
after each optimizer step the frozen values are written back, which undoes decoupled weight
decay, the one update that bypasses the gradient. :class:`NFFTCheck` verifies both at the
end of training. Scores are stored (bfloat16) in ``<output_dir>/nfft_scores.safetensors`` and
reused by later runs on the same model; the scoring examples do not depend on the training
seed, so one file serves every seed of an experiment.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError
from .methods import FreezePlan, MethodContext, MethodModule, MethodSetup, _layer_of
from .trainer import is_main

SCORES_FILE = "nfft_scores.safetensors"


def scored_weights(lm) -> dict[str, torch.nn.Parameter]:
    """The matrices Wei et al. score: every 2-D attention and MLP weight of every decoder layer."""
    params = lm.blocks.parameters(range(lm.num_layers))
    return {n: p for n, p in params.items() if p.dim() == 2}


def snip_scores(model, weights: dict[str, torch.nn.Parameter], examples: list, collator) -> dict[str, torch.Tensor]:
    """``sum over examples of |W * dL/dW|`` for each matrix in ``weights`` (one example per pass)."""
    was_training = model.training
    model.eval()                                         # no dropout: the score of the model as it is
    names, params = list(weights), list(weights.values())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in weights.items()}
    device = params[0].device
    try:
        for ex in examples:
            batch = {k: v.to(device) for k, v in collator([ex]).items() if k in ("input_ids", "attention_mask",
                                                                                  "labels")}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for n, p, g in zip(names, params, grads):
                if g is not None:
                    acc[n] += (p.detach().float() * g.float()).abs()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return acc


def nfft_masks(safety: dict[str, torch.Tensor], utility: dict[str, torch.Tensor], n_freeze: int,
               utility_top: float | None = None, band: str = "the band") -> tuple[dict[str, torch.Tensor], dict]:
    """The ``n_freeze`` entries with the highest safety score outside each matrix's utility top-p.

    Returns boolean masks (True: frozen) and what was chosen (q, p, how many could be picked).
    """
    names = sorted(safety)                 # one order however the scores were read: ties break the same way
    total = sum(s.numel() for s in safety.values())
    q = n_freeze / max(total, 1)
    p = q if utility_top is None else utility_top
    candidates, excluded = [], 0
    for name in names:
        s, u = safety[name], utility[name].reshape(-1)
        k = min(u.numel(), math.ceil(p * u.numel()))
        s = s.reshape(-1).float().clone()
        if k:
            s[_top(u.float(), k)] = -1.0                   # scores are >= 0: never picked
            excluded += k
        candidates.append(s)
    room = total - excluded
    if n_freeze > room:
        raise SafetyLayersError(
            f"{band} freezes {n_freeze:,} parameters but NFFT can match at most {room:,} (the entries outside "
            f"each matrix's utility top {p:.0%}): use a narrower band or a smaller nfft_utility_top")
    flat = torch.cat(candidates)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if n_freeze:
        chosen[_top(flat, n_freeze)] = True
    masks, at = {}, 0
    for name in names:
        masks[name] = chosen[at: at + safety[name].numel()].reshape(safety[name].shape)
        at += safety[name].numel()
    return masks, {"q": q, "utility_top": p, "candidates": room, "scored": total, "frozen": n_freeze}


def _top(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, ties to the lower index (a fresh and a reused run agree)."""
    return torch.sort(x, descending=True, stable=True).indices[:k]


def save_scores(path: Path, safety: dict, utility: dict, meta: dict) -> None:
    from safetensors.torch import save

    from ..core.runs import atomic_write

    tensors = {f"safety/{n}": t.to(torch.bfloat16).contiguous() for n, t in safety.items()}
    tensors.update({f"utility/{n}": t.to(torch.bfloat16).contiguous() for n, t in utility.items()})
    atomic_write(path, save(tensors, metadata={k: str(v) for k, v in meta.items()}))


def load_scores(path: Path, weights: dict[str, torch.nn.Parameter]) -> tuple[dict, dict]:
    """The stored (safety, utility) scores, checked against the model's matrices."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    safety = {n[len("safety/"):]: v for n, v in t.items() if n.startswith("safety/")}
    utility = {n[len("utility/"):]: v for n, v in t.items() if n.startswith("utility/")}
    bad = [n for n, p in weights.items() if n not in safety or n not in utility or safety[n].shape != p.shape]
    if bad or len(safety) != len(weights):
        raise SafetyLayersError(f"{path} holds NFFT scores of another model (e.g. {(bad or list(safety))[0]}): "
                                "delete it or point nfft_scores at this model's scores")
    return safety, utility


def _rounded(scores: dict) -> dict:
    """Scores as they are stored, so a fresh run and one reusing the file pick the same entries."""
    return {n: t.to(torch.bfloat16).float() for n, t in scores.items()}


@functools.lru_cache(maxsize=1)
def nfft_check_class():
    """Built on first use: importing ``transformers.TrainerCallback`` costs seconds."""
    from transformers import TrainerCallback

    class NFFTCheck(TrainerCallback):
        """Holds the frozen entries in place and checks, at the end, that they are bit-identical
        and that the optimizer's state for them is zero. Remove its hooks with :meth:`close`."""

        def __init__(self, weights: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]):
            self.weights = {n: weights[n] for n, m in masks.items() if m.any()}
            self.masks = {n: masks[n].to(weights[n].device) for n in self.weights}
            self.values = {n: p.detach()[self.masks[n]].clone() for n, p in self.weights.items()}
            self.hooks = [p.register_hook(functools.partial(_masked, mask=self.masks[n]))
                          for n, p in self.weights.items()]
            self.groups: list[dict] = []
            self.result = "not run"

        def restore(self, *_args, **_kwargs) -> None:
            with torch.no_grad():
                for n, p in self.weights.items():
                    p[self.masks[n]] = self.values[n]

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is None:
                return
            inner = getattr(optimizer, "optimizer", optimizer)          # accelerate wraps the torch optimizer
            self.hooks.append(inner.register_step_post_hook(self.restore))
            self.groups = [{"tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"]),
                            "weight_decay": g.get("weight_decay"), "lr": g.get("lr")} for g in optimizer.param_groups]

        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            changed = [n for n, p in self.weights.items() if not torch.equal(p.detach()[self.masks[n]], self.values[n])]
            if changed:
                raise RuntimeError(f"{len(changed)} NFFT-frozen matrices changed in training, e.g. {changed[0]}")
            moved = []
            for n, p in self.weights.items():
                st = optimizer.state.get(p, {}) if optimizer is not None else {}
                moved += [n for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape
                          and v[self.masks[n]].abs().sum() != 0]
            if moved:
                raise RuntimeError(f"the optimizer holds state for NFFT-frozen entries, e.g. {moved[0]}")
            self.result = "passed"
            self.close()

        def close(self) -> None:
            for h in self.hooks:
                h.remove()
            self.hooks = []

    return NFFTCheck


def _masked(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(mask, 0)


class NFFT(MethodModule):
    name = "nfft"

    def setup(self, ctx: MethodContext) -> MethodSetup:
        from transformers import Trainer

        cfg, lm = ctx.cfg, ctx.lm
        for p in lm.model.parameters():
            p.requires_grad_(True)
        band_params = lm.blocks.parameters(ctx.band, norms=cfg.freeze_norms)
        n_freeze = sum(p.numel() for p in band_params.values())
        weights = scored_weights(lm)
        path = Path(cfg.nfft_scores) if cfg.nfft_scores else ctx.output_dir / SCORES_FILE
        safety, utility, reused = self._scores(ctx, weights, path)
        masks, info = nfft_masks(_rounded(safety), _rounded(utility), n_freeze, cfg.nfft_utility_top,
                                 band=f"band {ctx.band}")
        check = nfft_check_class()(weights, masks)
        trainer = Trainer(model=lm.model, args=ctx.args, train_dataset=ctx.data.examples, data_collator=ctx.collator,
                          processing_class=lm.tokenizer, callbacks=[check] + ctx.callbacks)
        total = sum(p.numel() for p in lm.model.parameters())
        names = sorted(check.weights)
        plan = FreezePlan("nfft", [ctx.band.start, ctx.band.end], names, len(names), n_freeze,
                          sum(1 for _ in lm.model.parameters()), total - n_freeze, total)
        per_layer = _per_layer(masks, lm)
        info.update(scores=str(path), scores_reused=reused, frozen_per_layer=per_layer,
                    summary=f"nfft: {n_freeze:,} safety-critical weights frozen (as many as band {ctx.band}) "
                            f"in {len(names)} matrices; per layer {per_layer}; scores "
                            f"{'reused from' if reused else 'saved to'} {path}")
        return MethodSetup(lm.model, plan, check, trainer, info)

    def _scores(self, ctx: MethodContext, weights: dict, path: Path) -> tuple[dict, dict, bool]:
        if path.is_file():
            return (*load_scores(path, weights), True)
        from ..core.prompts import resolve_template
        from .baseline_data import alignment_examples, encode_examples

        cfg, lm = ctx.cfg, ctx.lm
        template = resolve_template(lm.tokenizer, cfg.template)
        safety_ex = encode_examples(lm.tokenizer, alignment_examples(cfg.alignment_data, cfg.nfft_samples,
                                                                     0), template, cfg.max_length)
        utility_ex = encode_examples(lm.tokenizer, _utility(ctx, template), template, cfg.max_length)
        if not safety_ex or not utility_ex:
            raise SafetyLayersError("NFFT has no safety or no utility example that fits max_length: raise "
                                    "--max_length or pass shorter alignment_data / nfft_utility rows")
        safety = snip_scores(lm.model, weights, safety_ex, ctx.collator)
        utility = snip_scores(lm.model, weights, utility_ex, ctx.collator)
        if is_main(ctx.args):
            save_scores(path, safety, utility, {"model": lm.name, "safety_examples": len(safety_ex),
                                                "utility_examples": len(utility_ex)})
        return safety, utility, False


def _utility(ctx: MethodContext, template: str) -> list:
    """Benign answers: the ``nfft_utility`` file, or bundled benign prompts with the model's own answers."""
    from ..align.data import Example, load_records, self_distill
    from .baseline_data import benign_prompts

    cfg = ctx.cfg
    if cfg.nfft_utility:
        if not Path(cfg.nfft_utility).is_file():
            raise SafetyLayersError(f"nfft_utility {cfg.nfft_utility} does not exist: pass an instruction/output "
                                    "file or leave it unset")
        rows = load_records(cfg.nfft_utility, ("instruction", "output"))[: cfg.nfft_samples]
        return [Example(r["instruction"], r["output"], "benign") for r in rows]
    answers, _, _ = self_distill(ctx.lm, benign_prompts(cfg.nfft_samples, 0), 64, template,
                                 progress=False, reopen=False)
    return [e for e in answers if e is not None]


def _per_layer(masks: dict[str, torch.Tensor], lm) -> dict[int, int]:
    out: dict[int, int] = {}
    for n, m in masks.items():
        layer = _layer_of(n, lm.blocks)
        out[layer] = out.get(layer, 0) + int(m.sum())
    return dict(sorted(out.items()))
