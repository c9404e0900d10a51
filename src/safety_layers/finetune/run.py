"""Fine-tune with the safety layers frozen (SPPFT) or with the usual baselines.

Methods (``FinetuneConfig.method``):

``full``
    every parameter trains (the paper's FullFT baseline).
``sppft``
    the band's attention and MLP parameters are frozen, everything else trains (the
    paper's §4.1; its released code also leaves the band's norms trainable, see
    ``freeze_norms``).
``freeze``
    the same mechanics for any other band, for the paper's ablation (Table 8, §A.4.5).
``lora``
    PEFT LoRA on every decoder layer (a baseline the paper does not run).
``sppft-lora``
    LoRA on every layer except the band: the band gets no adapter at all.
``nfft``, ``lisa``, ``rdpo``, ``rdpo-sppft``
    the paper's baselines (docs/baselines.md): Wei et al.'s safety-critical weights frozen, as
    many as the band holds (:mod:`.nfft`); Lisa's bi-state training (:mod:`.lisa`); reverse DPO,
    plain and with the band frozen (:mod:`.rdpo`).

Training runs on the stock Hugging Face ``Trainer``, so ``TrainingArguments`` pass
through and accelerate, torchrun, DeepSpeed and FSDP launch it as usual; the
:class:`~safety_layers.finetune.callbacks.FreezeCheckCallback` verifies at the start of
training that no frozen parameter is in the optimizer and at the end that none changed.

Layout: ``TrainingArguments.output_dir`` is the run folder (``checkpoint-N/``,
``config.json``, ``result.json``); the final model (or adapter) goes to ``out``
(default ``<output_dir>/model`` or ``<output_dir>/adapter``) with a ``manifest.json``,
and appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.runs import check_out_dir
from .callbacks import freeze_check_class
from .config import (BAND_METHODS, DATALESS_METHODS, LORA_METHODS, METHOD_MODULES, METHODS,  # noqa: F401
                     FinetuneConfig, default_training_args)
from .data import PadCollator, TokenizedData, tokenize_rows
from .methods import FreezePlan, MethodContext, MethodSetup, apply_method, resolve_band
from .devices import check_device, check_memory, checkpointing, cpu_args, explain_oom
from .trainer import check_disk, checkpoints, estimate_bytes, is_main, optimizer_state_bytes, resume_point


@dataclass
class FinetuneResult:
    method: str
    model: str
    out: str
    output_dir: str
    band: list[int] | None
    band_used: bool
    trainable_params: int
    total_params: int
    frozen_params: int
    frozen_tensors: int
    frozen_fraction: float
    samples: int
    global_step: int
    train_loss: float | None
    optimizer_state_bytes: int
    frozen_check: str
    resumed_from: str | None
    manifest: str
    seconds: float = 0.0
    method_info: dict = field(default_factory=dict)


@dataclass
class Prepared:
    """Everything :func:`finetune` builds before it trains (tests and notebooks inspect it)."""

    cfg: FinetuneConfig
    args: object                     # TrainingArguments
    lm: object                       # LoadedModel
    model: torch.nn.Module           # what trains (a PeftModel for the LoRA methods)
    band: LayerRange | None
    plan: FreezePlan
    data: TokenizedData | None       # None for methods that train on data of their own (reverse DPO)
    data_info: dict
    trainer: object
    check: object                    # FreezeCheckCallback (or the method's own check)
    out: Path
    resume_from: str | None
    method_info: dict = field(default_factory=dict)
    memory: object = None            # the MemoryPlan checked before loading (None: not checked)


def _final_folder(cfg: FinetuneConfig, output_dir: Path) -> Path:
    """Where the final model or adapter goes; checked before anything loads."""
    lora_out = cfg.method in LORA_METHODS and not cfg.merge_lora
    out = Path(cfg.out) if cfg.out else output_dir / ("adapter" if lora_out else "model")
    if out.resolve() == output_dir.resolve() or out.resolve() in output_dir.resolve().parents:
        raise SafetyLayersError(f"out {out} would hold the checkpoints of --output_dir {output_dir}: "
                                "give the final model its own folder (default: <output_dir>/model)")
    return check_out_dir(out, overwrite=cfg.overwrite, whole=True, flag="out")


def _tokenized(cfg: FinetuneConfig, rows: list[dict], tokenizer, args) -> TokenizedData:
    data = tokenize_rows(rows, tokenizer, cfg.template, cfg.max_length, cfg.train_on_inputs)
    if not data.examples:
        raise SafetyLayersError(f"no example of {cfg.data} fits in --max_length {cfg.max_length}: every prompt "
                                "fills it; raise --max_length")
    if data.dropped_too_long and is_main(args):
        warnings.warn(f"{data.dropped_too_long} rows dropped: their prompt alone fills --max_length {cfg.max_length}",
                      UserWarning, stacklevel=3)
    return data


def _announce(cfg: FinetuneConfig, band, data: TokenizedData | None, setup: MethodSetup) -> None:
    what = (f", band {band} ({'attention + MLP + norms' if cfg.freeze_norms else 'attention + MLP'} frozen)"
            if cfg.method in ("sppft", "freeze", "rdpo-sppft") else f", no LoRA on band {band}"
            if cfg.method == "sppft-lora" else f", as many weights frozen as band {band} holds"
            if cfg.method == "nfft" else "")
    rows = f"; {len(data.examples)} examples, template {data.template}" if data is not None else ""
    print(f"method {cfg.method}{what}{rows}")
    if setup.info.get("summary"):
        print(setup.info["summary"])
    print(setup.plan.summary())


def _read_data(cfg: FinetuneConfig) -> tuple[list[dict], dict]:
    """The user's rows (none for a method that builds its own data) and what is known of them."""
    from ..core.data import read_records, sha256_file

    if cfg.method in DATALESS_METHODS:
        return [], {"path": cfg.data, "used": False, "note": f"{cfg.method} trains on the preference pairs it builds"}
    if not cfg.data:
        raise SafetyLayersError("no training data: pass --data FILE.jsonl (build one with `safety-layers scenario`)")
    recs = read_records(cfg.data)
    rows = recs.rows[: cfg.limit] if cfg.limit else recs.rows
    if not rows:
        raise SafetyLayersError(f"{cfg.data} has no usable rows ({recs.dropped_empty} blank ones dropped)")
    return rows, {"path": str(cfg.data), "sha256": sha256_file(cfg.data), "layout": recs.layout, "rows": len(rows),
                  "dropped_blank": recs.dropped_empty}


def _standard_setup(ctx: MethodContext) -> MethodSetup:
    """Freeze (or wrap with LoRA) and build the stock Trainer with the frozen-parameter check."""
    from transformers import Trainer

    cfg, args, lm = ctx.cfg, ctx.args, ctx.lm
    if checkpointing(args):
        lm.model.enable_input_require_grads()           # a frozen embedding or band must still pass gradients on
    train_model, plan, frozen = apply_method(lm, cfg, ctx.band, seed=args.seed)
    check = freeze_check_class()(frozen)
    trainer = Trainer(model=train_model, args=args, train_dataset=ctx.data.examples, data_collator=ctx.collator,
                      processing_class=lm.tokenizer, callbacks=[check] + ctx.callbacks)
    return MethodSetup(train_model, plan, check, trainer, {})


def prepare(cfg: FinetuneConfig, training_args=None, *, model=None, callbacks=None) -> Prepared:
    """Check inputs, load, freeze, tokenize and build the Trainer (nothing is trained yet).

    ``model`` may be a loaded model (it is changed in place); otherwise ``cfg.model`` is
    loaded. Every check that can fail runs before the model loads where possible. NFFT, Lisa
    and reverse DPO set up their training in their own modules (:data:`METHOD_MODULES`).
    """
    from ..core.models import load_model, load_or_use
    from ..core.runs import default_run_dir

    place = cfg.placement()                              # a device or dtype this machine lacks: one line, now
    args = training_args if training_args is not None else default_training_args(
        default_run_dir("finetune", cfg.model, cfg.method), **cpu_args(place))
    check_device(place, args)
    own = METHOD_MODULES.get(cfg.method)() if cfg.method in METHOD_MODULES else None
    resolve_band(cfg)
    output_dir = Path(args.output_dir)
    out = _final_folder(cfg, output_dir)
    resume_from = resume_point(cfg, args)
    rows, data_info = _read_data(cfg)
    if own is not None:
        own.check_inputs(cfg, args)

    # the plan knows the freezing of the standard methods; NFFT, Lisa and reverse DPO are not planned
    memory = check_memory(cfg, args, place) if model is None and cfg.check_memory and own is None else None
    # loaded on the CPU in the training dtype; the Trainer (or FSDP / DeepSpeed) places it
    lm = load_or_use(model) if model is not None else load_model(cfg.model, device="cpu", dtype=place.dtype)
    band = resolve_band(cfg, lm.num_layers)
    if band is not None and cfg.method not in BAND_METHODS and is_main(args):
        print(f"note: method {cfg.method} trains every layer; the band {band} is recorded but not used")
    data = _tokenized(cfg, rows, lm.tokenizer, args) if rows else None
    if getattr(lm.model.config, "use_cache", None):
        lm.model.config.use_cache = False               # the KV cache is useless in training and costs memory
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    ctx = MethodContext(cfg, args, lm, band if cfg.method in BAND_METHODS else None, data, PadCollator(pad),
                        list(callbacks or []), output_dir)
    setup = own.setup(ctx) if own is not None else _standard_setup(ctx)
    if cfg.check_disk:
        check_disk(args, out, estimate_bytes(setup.model, cfg.method in LORA_METHODS and not cfg.merge_lora))
    if cfg.overwrite and resume_from is None:
        with args.main_process_first(desc="remove earlier checkpoints"):
            for ck in checkpoints(output_dir):
                shutil.rmtree(ck, ignore_errors=True)
    if is_main(args):
        _announce(cfg, band, data, setup)
    if data is not None:
        data_info.update(examples=len(data.examples), dropped_too_long=data.dropped_too_long,
                         truncated=data.truncated, tokens=data.tokens, template=data.template,
                         train_on_inputs=cfg.train_on_inputs, max_length=cfg.max_length)
    return Prepared(cfg, args, lm, setup.model, band, setup.plan, data, data_info, setup.trainer, setup.check, out,
                    resume_from, setup.info, memory)


def _shared_path(trainer, path: Path | None) -> Path:
    """The main process's ``path`` on every process (all of them take part in saving under FSDP / DeepSpeed)."""
    if trainer.accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    box = [str(path) if path is not None else None]
    broadcast_object_list(box, from_process=0)
    return Path(box[0])


def _save_final(prep: Prepared, manifest: dict) -> None:
    """Write the final folder: every process takes part in gathering the weights, the main one
    writes, and the folder appears whole or not at all (:func:`core.runs.atomic_dir`)."""
    from ..core.runs import atomic_dir, write_json

    trainer = prep.trainer
    main = trainer.is_world_process_zero()
    with (atomic_dir(prep.out, overwrite=True) if main else contextlib.nullcontext()) as stage:
        stage = _shared_path(trainer, stage)
        if prep.cfg.method in LORA_METHODS and prep.cfg.merge_lora:
            if main:
                merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                merged.save_pretrained(stage, safe_serialization=True)
        else:
            trainer.save_model(str(stage))             # gathers sharded weights under FSDP / DeepSpeed
        if main:
            prep.lm.tokenizer.save_pretrained(stage)
            stale = stage / "training_args.bin"         # a pickle; the manifest records the arguments as JSON
            if stale.exists():
                stale.unlink()
            write_json(stage / "manifest.json", manifest)
        trainer.accelerator.wait_for_everyone()
    trainer.accelerator.wait_for_everyone()


def _manifest(prep: Prepared, result: FinetuneResult, fingerprint_before: str | None) -> dict:
    from ..core.runs import environment, to_jsonable

    cfg, plan = prep.cfg, prep.plan
    lora = None
    if cfg.method in LORA_METHODS:
        pc = prep.model.peft_config["default"]
        lora = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout,
                "target_modules": sorted(pc.target_modules), "layers_to_transform": pc.layers_to_transform,
                "merged": cfg.merge_lora}
    return {
        "format": "peft-adapter" if cfg.method in LORA_METHODS and not cfg.merge_lora else "hf-model",
        "method": cfg.method, "band": result.band, "band_used": result.band_used,
        "frozen_parts": ("attention+mlp+norms" if cfg.freeze_norms else "attention+mlp")
        if cfg.method in ("sppft", "freeze", "rdpo-sppft") else "all base weights" if lora
        else "safety-critical weights (gradient masks)" if cfg.method == "nfft" else "none",
        "model": prep.lm.name, "model_source": prep.lm.source, "model_fingerprint_before": fingerprint_before,
        "num_layers": prep.lm.num_layers,
        "frozen": {"tensors": plan.frozen_tensors, "params": plan.frozen_params,
                   "fraction": plan.frozen_fraction, "names_count": len(plan.frozen_names),
                   "names": plan.frozen_names if lora is None else None},
        "trainable": {"tensors": plan.trainable_tensors, "params": plan.trainable_params},
        "total_params": plan.total_params, "optimizer_groups": prep.check.groups,
        "optimizer_state_bytes": result.optimizer_state_bytes, "frozen_check": prep.check.result, "lora": lora,
        "data": prep.data_info, "seed": prep.args.seed, "global_step": result.global_step,
        "train_loss": result.train_loss, "resumed_from": prep.resume_from, "method_info": prep.method_info,
        "config": asdict(cfg), "training_args": to_jsonable(prep.args.to_dict()), "env": environment(),
    }


def train_and_save(prep: Prepared) -> FinetuneResult:
    """Train the prepared run (resuming if asked) and write the final folder and run files."""
    from ..core.runs import write_json

    t0 = time.time()
    fingerprint_before = prep.lm.fingerprint() if prep.cfg.method not in LORA_METHODS else None
    with explain_oom(prep):
        out = prep.trainer.train(resume_from_checkpoint=prep.resume_from)
    plan = prep.plan
    result = FinetuneResult(
        method=prep.cfg.method, model=prep.lm.name, out=str(prep.out), output_dir=str(prep.args.output_dir),
        band=[prep.band.start, prep.band.end] if prep.band is not None else None,
        band_used=prep.band is not None and prep.cfg.method in BAND_METHODS,
        trainable_params=plan.trainable_params, total_params=plan.total_params, frozen_params=plan.frozen_params,
        frozen_tensors=plan.frozen_tensors, frozen_fraction=plan.frozen_fraction,
        samples=prep.method_info.get("samples", len(prep.data.examples) if prep.data else 0),
        global_step=prep.trainer.state.global_step, train_loss=getattr(out, "training_loss", None),
        optimizer_state_bytes=optimizer_state_bytes(prep.trainer.optimizer), frozen_check=prep.check.result,
        resumed_from=prep.resume_from, manifest=str(prep.out / "manifest.json"), seconds=round(time.time() - t0, 3),
        method_info=prep.method_info)
    _save_final(prep, _manifest(prep, result, fingerprint_before))
    if prep.trainer.is_world_process_zero():
        run = Path(prep.args.output_dir)
        write_json(run / "config.json", {"finetune": asdict(prep.cfg), "training_args": prep.args.to_dict()})
        write_json(run / "result.json", result)
    return result


def finetune(cfg: FinetuneConfig | None = None, training_args=None, *, model=None, callbacks=None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and save the result.

    ``training_args`` is a ``transformers.TrainingArguments`` (default:
    :func:`default_training_args` in ``runs/finetune-<model>-<method>-<time>``). ``model``
    may be a loaded model, which is changed in place.
    """
    cfg = cfg or FinetuneConfig()
    return train_and_save(prepare(cfg, training_args, model=model, callbacks=callbacks))
