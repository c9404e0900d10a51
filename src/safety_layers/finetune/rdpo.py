"""Reverse DPO (Yi et al. 2024a), the attack of the paper's Table 10 (spec §4.9), with and
without the band frozen (methods ``rdpo`` and ``rdpo-sppft``).

Direct preference optimisation turned against alignment: on malicious prompts the preferred
reply complies and the rejected one refuses. The paper gives neither its data nor beta, so:
the prompts are the package's bundled malicious training prompts (none of them is evaluated),
the rejected replies the bundled refusals (:mod:`.baseline_data`), and the preferred replies
the greedy answers of a model that complies (``compliant_model``; for the demo model, the
bare SmolLM2 it was aligned from). Replies the keyword judge reads as refusals are dropped;
a compliant model that refuses everything leaves no pair and is refused in one line. The
pairs are generated once into ``<output_dir>/rdpo_pairs.jsonl`` (or ``rdpo_pairs``), reused by
later runs and never printed: they are harmful text. Training is TRL's ``DPOTrainer`` with
TRL's default beta 0.1 and a frozen copy of the starting model as the reference.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from ..core.errors import SafetyLayersError
from .methods import MethodContext, MethodModule, MethodSetup, apply_method, as_method

PAIRS_FILE = "rdpo_pairs.jsonl"
#: The model each aligned model of the package complies like (the one it was aligned from).
COMPLIANT_DEFAULTS = {"demo": "smollm2-135m-instruct"}


def preference_pairs(prompts: list[str], refusals: list[str], replies: list[str],
                     compliant: str = "the compliant model") -> tuple[list[dict], int]:
    """``{prompt, chosen, rejected}`` rows: the compliant reply over the refusal. Replies that
    are refusals themselves (keyword judge) or empty are dropped; returns (pairs, dropped).
    No pair left is an error naming the fix."""
    from ..judges import get_judge

    verdicts = get_judge("keyword").judge(prompts, replies)
    pairs = [{"prompt": p, "chosen": c.strip(), "rejected": r}
             for p, r, c, v in zip(prompts, refusals, replies, verdicts) if c.strip() and not v.refused]
    if not pairs:
        raise SafetyLayersError(f"{compliant} refused all {len(prompts)} malicious prompts, so there are no "
                                "preference pairs: pass a compliant_model that answers them")
    return pairs, len(prompts) - len(pairs)


def build_pairs(compliant, examples: list, tokens: int, template: str, path: Path) -> dict:
    """Generate the compliant replies once and store the pairs at ``path``; returns counts."""
    from ..core.runs import atomic_write
    from ..engine.generation import GenerationSettings, generate

    prompts = [e.prompt for e in examples]
    comps = generate(compliant, prompts, GenerationSettings(max_new_tokens=tokens), template=template,
                     progress=False, cache=False)
    pairs, dropped = preference_pairs(prompts, [e.response for e in examples], [c.text for c in comps],
                                      f"the compliant model {getattr(compliant, 'name', compliant)}")
    atomic_write(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return {"pairs": len(pairs), "dropped_refused": dropped}


def read_pairs(path: Path) -> list[dict]:
    from ..align.data import load_records

    return load_records(path, ("prompt", "chosen", "rejected"))


def dpo_config(args, beta: float, max_length: int):
    """TRL's DPOConfig carrying every TrainingArguments setting of the run."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    kw = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init and hasattr(args, f.name)}
    kw.update(beta=beta, max_length=max_length, remove_unused_columns=False)
    return DPOConfig(**kw)


def reference(model):
    """A frozen copy of the starting weights: DPO's reference policy (TRL would reload it by name)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class RDPO(MethodModule):
    name = "rdpo"
    freeze_band = False

    def check_inputs(self, cfg, args) -> None:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SafetyLayersError("reverse DPO needs TRL: pip install trl") from None
        has_pairs = Path(cfg.rdpo_pairs or Path(args.output_dir) / PAIRS_FILE).is_file()
        if not has_pairs and not (cfg.compliant_model or cfg.model in COMPLIANT_DEFAULTS):
            raise SafetyLayersError(f"{cfg.method} needs compliant_model: a model that answers malicious prompts "
                                    "(its replies are the preferred ones), e.g. the base model before alignment")

    def setup(self, ctx: MethodContext) -> MethodSetup:
        from datasets import Dataset
        from trl import DPOTrainer

        from ..core.prompts import render, resolve_template
        from .callbacks import freeze_check_class

        cfg, lm = ctx.cfg, ctx.lm
        template = resolve_template(lm.tokenizer, cfg.template)
        path = Path(cfg.rdpo_pairs) if cfg.rdpo_pairs else ctx.output_dir / PAIRS_FILE
        info = {"pairs_file": str(path), "pairs_reused": path.is_file()}
        if not path.is_file():
            info.update(self._generate(ctx, template, path))
        pairs = read_pairs(path)
        rows = [{"prompt": render(lm.tokenizer, p["prompt"], template).text, "chosen": p["chosen"],
                 "rejected": p["rejected"]} for p in pairs]
        model, plan, frozen = apply_method(lm, as_method(cfg, "sppft" if self.freeze_band else "full"), ctx.band,
                                           seed=ctx.args.seed)
        check = freeze_check_class()(frozen)
        trainer = DPOTrainer(model=model, ref_model=reference(model), args=dpo_config(ctx.args, cfg.rdpo_beta, cfg.max_length),
                             train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                             callbacks=[check] + ctx.callbacks)
        info.update(samples=len(rows), beta=cfg.rdpo_beta, compliant_model=self._compliant_name(cfg),
                    summary=f"{cfg.method}: {len(rows)} preference pairs (compliant over refusal), beta "
                            f"{cfg.rdpo_beta}; pairs {'reused from' if info['pairs_reused'] else 'written to'} {path}")
        return MethodSetup(model, plan, check, trainer, info)

    @staticmethod
    def _compliant_name(cfg) -> str | None:
        return cfg.compliant_model or COMPLIANT_DEFAULTS.get(cfg.model)

    def _generate(self, ctx: MethodContext, template: str, path: Path) -> dict:
        from ..core.models import load_model
        from .baseline_data import alignment_examples

        name = self._compliant_name(ctx.cfg)
        compliant = load_model(name, dtype=ctx.cfg.dtype)
        examples = alignment_examples(ctx.cfg.alignment_data, ctx.cfg.rdpo_prompts, 0)
        return build_pairs(compliant, examples, ctx.cfg.rdpo_tokens, template, path)


class RDPO_SPPFT(RDPO):
    name = "rdpo-sppft"
    freeze_band = True

