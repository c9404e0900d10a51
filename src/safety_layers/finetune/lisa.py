"""Lisa, lazy safety alignment: the paper's baseline for the harmful-data attack (Tab.3/7, spec §4.4).

Huang et al. 2024b ("Lazy safety alignment for large language models against harmful
fine-tuning", arXiv 2405.18641) fine-tune in two alternating states (bi-state optimisation):
``K1`` steps on alignment data (refusals to malicious prompts) and ``K2`` steps on the user's
data, each state's loss plus a proximal term ``rho/2 * ||w - w_anchor||^2`` that keeps the
weights near where the other state left them (the anchor is taken at every switch). The
paper used Lisa's default settings (spec §4.3), which are those of the Lisa paper's main
experiments: ``K1 = 100`` alignment and ``K2 = 900`` fine-tuning steps per round and proximal
intensity ``rho = 1``; ``lisa_alignment_steps``, ``lisa_finetune_steps`` and ``lisa_rho`` change
them.

The run keeps the Trainer's length: a step of the alignment state takes a batch of alignment
data in place of the user's batch, so with the defaults one step in ten trains on refusals.
Alignment data are ``alignment_data`` (prompt/response rows) or the package's bundled
malicious training prompts with its refusals (:mod:`.baseline_data`).
"""

from __future__ import annotations

import functools

import torch

from ..core.errors import SafetyLayersError
from .methods import MethodContext, MethodModule, MethodSetup, apply_method, as_method


def in_alignment_state(step: int, alignment_steps: int, finetune_steps: int) -> bool:
    """Whether optimizer step ``step`` (0-based) belongs to a round's alignment state (its first K1 steps)."""
    return step % (alignment_steps + finetune_steps) < alignment_steps


def proximal(params: list[tuple[torch.nn.Parameter, torch.Tensor]], rho: float) -> torch.Tensor:
    """``rho/2 * sum ||w - anchor||^2`` over the trainable parameters."""
    return rho / 2 * sum(((p - a) ** 2).sum() for p, a in params)


@functools.lru_cache(maxsize=1)
def lisa_trainer_class():
    """Built on first use: importing ``transformers.Trainer`` costs seconds."""
    from transformers import Trainer

    class LisaTrainer(Trainer):
        """The stock Trainer whose loss alternates between the two states and adds the proximal term."""

        def __init__(self, *args, alignment: list, alignment_steps: int, finetune_steps: int, rho: float,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.alignment, self.k1, self.k2, self.rho = alignment, alignment_steps, finetune_steps, rho
            self.anchor: list | None = None
            self.anchor_state: bool | None = None
            self.alignment_batches = 0
            self.gen = torch.Generator().manual_seed(self.args.seed)

        def _alignment_batch(self, device) -> dict:
            pick = torch.randint(len(self.alignment), (self.args.per_device_train_batch_size,), generator=self.gen)
            batch = self.data_collator([self.alignment[i] for i in pick.tolist()])
            self.alignment_batches += 1
            return {k: v.to(device) for k, v in batch.items()}

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            aligning = self.k1 > 0 and in_alignment_state(self.state.global_step, self.k1, self.k2)
            if aligning != self.anchor_state:            # a switch: the anchor is where the other state left off
                self.anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
                self.anchor_state = aligning
            if aligning:
                inputs = self._alignment_batch(inputs["input_ids"].device)
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if self.rho:
                term = proximal(self.anchor, self.rho)
                loss = (loss[0] + term, loss[1]) if return_outputs else loss + term
            return loss

    return LisaTrainer


class LISA(MethodModule):
    name = "lisa"

    def check_inputs(self, cfg, args) -> None:
        from pathlib import Path

        if cfg.alignment_data and not Path(cfg.alignment_data).is_file():
            raise SafetyLayersError(f"lisa's alignment data {cfg.alignment_data} does not exist: pass a JSONL file of "
                                    "prompt/response refusal pairs, or leave alignment_data unset for the bundled ones")

    def setup(self, ctx: MethodContext) -> MethodSetup:
        from ..core.prompts import resolve_template
        from .baseline_data import alignment_examples, encode_examples
        from .callbacks import freeze_check_class

        cfg, lm = ctx.cfg, ctx.lm
        template = resolve_template(lm.tokenizer, cfg.template)
        alignment = encode_examples(lm.tokenizer, alignment_examples(cfg.alignment_data, seed=ctx.args.seed),
                                    template, cfg.max_length)
        if not alignment and cfg.lisa_alignment_steps:
            raise SafetyLayersError("lisa has no alignment example that fits max_length: raise --max_length or "
                                    "pass shorter alignment_data rows")
        model, plan, frozen = apply_method(lm, as_method(cfg, "full"), None, seed=ctx.args.seed)
        check = freeze_check_class()(frozen)
        trainer = lisa_trainer_class()(
            model=model, args=ctx.args, train_dataset=ctx.data.examples, data_collator=ctx.collator,
            processing_class=lm.tokenizer, callbacks=[check] + ctx.callbacks, alignment=alignment,
            alignment_steps=cfg.lisa_alignment_steps, finetune_steps=cfg.lisa_finetune_steps, rho=cfg.lisa_rho)
        info = {"alignment_examples": len(alignment), "alignment_data": cfg.alignment_data or "bundled",
                "alignment_steps": cfg.lisa_alignment_steps, "finetune_steps": cfg.lisa_finetune_steps,
                "rho": cfg.lisa_rho,
                "summary": f"lisa: rounds of {cfg.lisa_alignment_steps} alignment + {cfg.lisa_finetune_steps} "
                           f"fine-tuning steps, proximal rho {cfg.lisa_rho}, {len(alignment)} alignment examples"}
        return MethodSetup(model, plan, check, trainer, info)

