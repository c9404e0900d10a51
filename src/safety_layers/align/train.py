"""Supervised fine-tuning for alignment, on the Hugging Face Trainer.

:func:`train_sft` runs the fine-tuning package's pieces (token ids and collation,
:func:`~safety_layers.finetune.methods.add_lora`, :meth:`Blocks.parameters` for the frozen
band, the frozen-parameter check) on a ``Trainer`` subclass that brings what alignment
needs: the weighted response loss of :mod:`.loss`, AdamW with a linear warmup and decay,
gradients clipped to norm 1, and its own batch plan: each epoch shuffled (seeded), items
sorted by length within windows of 8 batches so a batch pads little, the batch order
shuffled again. ``TrainingArguments`` pass through (``SFTSettings.training_args``), so
accelerate, torchrun, DeepSpeed and FSDP launch it as they launch fine-tuning.

The prompt prefix every example shares (the chat template's system turn, a third of a short
SmolLM2 example) is run once per step without gradient and its keys and values reused by the
batch (``prefix_cache``): the loss is unchanged, the gradient drops only the paths through
those keys and values.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.models import LoadedModel, find_blocks
from ..core.runs import read_json, write_json
from ..finetune.data import IGNORE_INDEX, Encoded, PadCollator
from .config import SFTSettings
from .data import Example, avoid_row, encode_example
from .loss import response_loss, shared_prefix


@dataclass
class TrainStats:
    steps: int
    examples: int
    tokens: int                   # real (unpadded) tokens in the batches; a cached shared prefix counts in every row
    trained_tokens: int           # tokens that carried loss
    dropped_too_long: int
    epoch_losses: list[float]
    seconds: float
    trainable_parameters: int
    total_parameters: int
    losses: list[float] = field(default_factory=list)   # every batch's loss, in training order
    resumed_from_step: int | None = None                 # the checkpoint a rerun continued from


# --------------------------------------------------------------------------- the batch plan and schedule

def _batches(n_items: int, lengths: list[int], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled batches; items are sorted by length within windows of 8 batches
    so a batch pads little, and the batch order is shuffled again."""
    order = torch.randperm(n_items, generator=gen).tolist()
    window = batch_size * 8
    batches = []
    for s in range(0, n_items, window):
        chunk = sorted(order[s:s + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def batch_plan(lengths: list[int], batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """``steps`` batches of item indices, epoch after epoch (:func:`_batches`), seeded."""
    gen = torch.Generator().manual_seed(seed)
    plan: list[list[int]] = []
    while len(plan) < steps:
        plan += _batches(len(lengths), lengths, batch_size, gen)
    return plan[:steps]


class PlanSampler(torch.utils.data.Sampler):
    """A batch sampler that yields a fixed plan of batches, in order."""

    def __init__(self, plan: list[list[int]], batch_size: int):
        super().__init__()
        self.plan, self.batch_size, self.drop_last = plan, batch_size, False

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def warmup_decay(optimizer, total: int, warm: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warm`` steps (step k at (k+1)/warm of the peak), then linear decay
    to zero at step ``total``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: (k + 1) / warm if k < warm else max(0.0, (total - k) / max(1, total - warm)))


# --------------------------------------------------------------------------- the trainer

@functools.lru_cache(maxsize=1)
def sft_trainer_class():
    """The Trainer subclass, built on first use (importing ``transformers.Trainer`` costs seconds)."""
    from transformers import Trainer

    class SFTTrainer(Trainer):
        """The Trainer with :func:`~safety_layers.align.loss.response_loss`, AdamW over the
        trainable parameters in one group, :func:`warmup_decay` and a fixed batch plan.

        Under n processes or g accumulation steps each optimizer step takes n x g batches of
        the plan; on one process without accumulation it is the plan's batch, step for step.
        """

        loss_is_scaled_for_ga = False     # a per-batch mean: the Trainer divides it by the accumulation steps

        def __init__(self, *args, plan: list[list[int]], settings: SFTSettings, prefix: torch.Tensor | None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.plan, self.settings, self.prefix = plan, settings, prefix
            self.batch_losses: list[float] = []
            self.tokens = self.trained_tokens = 0

        def get_train_dataloader(self):
            loader = torch.utils.data.DataLoader(
                self.train_dataset, batch_sampler=PlanSampler(self.plan, self.settings.batch_size),
                collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                params = [p for p in (model or self.model).parameters() if p.requires_grad]
                a = self.args
                self.optimizer = torch.optim.AdamW(params, lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                                   eps=a.adam_epsilon, weight_decay=a.weight_decay)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                warm = math.ceil(self.settings.warmup * num_training_steps)
                self.lr_scheduler = warmup_decay(optimizer or self.optimizer, num_training_steps, warm)
            return self.lr_scheduler

        def log(self, logs, *args, **kwargs):
            if self.args.logging_strategy != "no":    # else the end-of-training summary is all there is to print
                super().log(logs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            wrapped = model is not self.model or self.is_fsdp_enabled or self.is_deepspeed_enabled
            loss = response_loss(model, inputs, self.prefix, self.settings.unlikelihood_weight, wrapped=wrapped)
            if model.training:
                self.batch_losses.append(loss.item())
                self.tokens += int(inputs["attention_mask"].sum())
                self.trained_tokens += int((inputs["labels"] != IGNORE_INDEX).sum())
            return (loss, None) if return_outputs else loss

    return SFTTrainer


def sft_arguments(s: SFTSettings, output_dir: str, progress: bool, keep: int | None = None):
    """TrainingArguments of an SFT run: the settings' optimiser values, no logs, no checkpoints
    but those a callback asks for (``keep``: how many stay), then ``s.training_args`` on top."""
    from ..finetune.config import default_training_args

    base = dict(per_device_train_batch_size=s.batch_size, num_train_epochs=1, max_steps=-1, learning_rate=s.lr,
                weight_decay=s.weight_decay, max_grad_norm=s.grad_clip, seed=s.seed, save_strategy="no",
                logging_strategy="no", disable_tqdm=not progress, remove_unused_columns=False,
                dataloader_pin_memory=torch.cuda.is_available(), save_total_limit=keep)
    return default_training_args(output_dir, **{**base, **s.training_args})


# --------------------------------------------------------------------------- checkpoints and resuming

SETUP, STATS = "setup.json", "sft_stats.json"


@functools.lru_cache(maxsize=1)
def checkpoint_clock_class():
    """A callback asking the Trainer for a checkpoint every ``seconds`` of training (0: every
    step, and always at the last), writing into it the batch losses and token counts that
    :class:`TrainStats` reports, so a resumed run reports the whole run."""
    from transformers import TrainerCallback

    class CheckpointClock(TrainerCallback):
        def __init__(self, seconds: float):
            self.seconds, self.last, self.trainer = seconds, time.monotonic(), None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps or time.monotonic() - self.last >= self.seconds:
                control.should_save = True           # the Trainer saves right after this step's callbacks
                t = self.trainer                     # first, so no checkpoint exists without its statistics
                if state.is_world_process_zero and t is not None:
                    write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATS,
                               {"losses": t.batch_losses, "tokens": t.tokens, "trained_tokens": t.trained_tokens})

        def on_save(self, args, state, control, **kwargs):
            self.last = time.monotonic()

    return CheckpointClock


def _setup_digest(lm: LoadedModel, rows: list[Encoded], s: SFTSettings, template: str) -> str:
    """What the checkpoints of a run depend on: the base model, the token ids and weights of
    every example, the settings and the template."""
    h = hashlib.sha256(json.dumps({"model": lm.fingerprint(), "template": template,
                                   "settings": {k: v for k, v in asdict(s).items() if k != "checkpoint_seconds"}},
                                  sort_keys=True, default=str).encode())
    for e in rows:
        h.update(json.dumps([e.input_ids, e.labels, e.weight, [(x.input_ids, x.labels) for x in e.extra]]).encode())
    return h.hexdigest()[:16]


def resume_point(work: Path, setup: str) -> Path | None:
    """The last checkpoint in the work folder ``work`` if it was written for ``setup``; a work
    folder of other settings or data is cleared, so a rerun never continues a different run."""
    from ..finetune.trainer import checkpoints

    old = read_json(work / SETUP, "checkpoint setup") if (work / SETUP).is_file() else {}
    if old.get("setup") != setup:
        shutil.rmtree(work, ignore_errors=True)
    ckpts = [c for c in checkpoints(work) if (c / "trainer_state.json").is_file()]
    write_json(work / SETUP, {"setup": setup})
    return ckpts[-1] if ckpts else None


def _restore_stats(trainer, checkpoint: Path | None) -> None:
    if checkpoint is not None and (checkpoint / STATS).is_file():
        saved = read_json(checkpoint / STATS, "training statistics")
        trainer.batch_losses = list(saved["losses"])
        trainer.tokens, trainer.trained_tokens = saved["tokens"], saved["trained_tokens"]


# --------------------------------------------------------------------------- training

def _rows(lm: LoadedModel, examples: list[Example], s: SFTSettings, template: str) -> tuple[list[Encoded], int]:
    """Each example's token ids with its kind's loss weight, and its negative opening beside it."""
    tok = lm.tokenizer
    if tok.eos_token_id is None:
        raise SafetyLayersError("the tokenizer has no EOS token, so the model cannot learn to end a reply: "
                                "set tokenizer.eos_token to its end-of-turn token")
    rows, dropped = [], 0
    for ex in examples:
        e = encode_example(tok, ex, template, s.max_length)
        if e is None:
            dropped += 1
            continue
        e.weight = float(s.kind_weights.get(ex.kind, 1.0))
        neg = avoid_row(tok, ex, template, s.max_length) if s.unlikelihood_weight > 0 else None
        e.extra = [neg] if neg is not None else []
        rows.append(e)
    if not rows:
        raise SafetyLayersError(f"no example fits in max_length={s.max_length} tokens: raise max_length")
    return rows, dropped


def _trainable(lm: LoadedModel, s: SFTSettings):
    """The model to train (LoRA-wrapped for ``method="lora"``) and the frozen band's parameters."""
    from ..finetune.methods import add_lora, freeze

    model = lm.model
    if s.method == "lora":
        model = add_lora(lm, r=s.lora_r, alpha=s.lora_alpha, dropout=0.0, seed=s.seed)
    else:
        torch.manual_seed(s.seed)
    frozen = {}
    if s.frozen_layers is not None:       # the whole block: attention, MLP (with their adapters) and norms
        frozen = freeze(lm.blocks, LayerRange.parse(s.frozen_layers).check(len(lm.blocks)), norms=True)
    return model, frozen


def train_sft(lm: LoadedModel, examples: list[Example], settings: SFTSettings | None = None, *,
              template: str = "chat", progress: bool = True, callbacks=None,
              checkpoints: str | Path | None = None) -> TrainStats:
    """Fine-tune ``lm`` in place on ``examples`` (loss on responses only).

    ``callbacks`` are ``transformers.TrainerCallback``s (e.g. one that measures refusal every
    few steps). ``method="lora"`` trains rank-``lora_r`` adapters on every attention and MLP
    matrix and merges them into the weights afterwards, so ``lm.model`` stays a plain model.
    With ``checkpoints`` (a work folder), a checkpoint is written every
    ``settings.checkpoint_seconds`` of training and at the end, and a rerun with the same
    model, examples and settings continues from the last one: same batches, same result.
    Reproducible for a given seed, thread count and machine.
    """
    from ..finetune.callbacks import freeze_check_class

    s = settings or SFTSettings()
    rows, dropped = _rows(lm, examples, s, template)
    model, frozen = _trainable(lm, s)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in lm.model.parameters())
    per_epoch = math.ceil(len(rows) / s.batch_size)
    plan = batch_plan([len(e.input_ids) for e in rows], s.batch_size, max(1, math.ceil(s.epochs * per_epoch)), s.seed)
    prefix = torch.tensor(shared_prefix(rows), dtype=torch.long) if s.prefix_cache else None
    tok = lm.tokenizer
    collator = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, multiple=1,
                           opening=(s.opening_tokens, s.opening_weight))
    use_cache = getattr(lm.model.config, "use_cache", None)
    callbacks = ([freeze_check_class()(frozen, verbose=False)] if frozen else []) + list(callbacks or [])
    resume, clock = None, None
    if checkpoints is not None:
        resume = resume_point(Path(checkpoints), _setup_digest(lm, rows, s, template))
        clock = checkpoint_clock_class()(s.checkpoint_seconds)
        callbacks.append(clock)
    t0 = time.perf_counter()
    with (contextlib.nullcontext(str(checkpoints)) if checkpoints is not None
          else tempfile.TemporaryDirectory(prefix="safety-layers-sft-")) as run_dir:
        args = sft_arguments(s, run_dir, progress, keep=1 if checkpoints is not None else None)
        trainer = sft_trainer_class()(model=model, args=args, train_dataset=rows, data_collator=collator,
                                      callbacks=callbacks, plan=plan, settings=s, prefix=prefix)
        if clock is not None:
            clock.trainer = trainer
        _restore_stats(trainer, resume)
        lm.model.config.use_cache = use_cache   # the Trainer turns it off; the saved model keeps its own
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    if s.method == "lora":
        lm.model = model.merge_and_unload()
        lm.blocks = find_blocks(lm.model)
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(True)
    losses = trainer.batch_losses
    epochs = [losses[i:i + per_epoch] for i in range(0, len(losses), per_epoch)]
    epoch_losses = [sum(e) / len(e) for e in epochs]
    return TrainStats(steps=trainer.state.global_step, examples=len(rows), tokens=trainer.tokens,
                      trained_tokens=trainer.trained_tokens, dropped_too_long=dropped, epoch_losses=epoch_losses,
                      seconds=time.perf_counter() - t0, trainable_parameters=n_train, total_parameters=n_total,
                      losses=losses, resumed_from_step=int(resume.name.split("-")[1]) if resume is not None else None)


@torch.no_grad()
def mean_loss(lm: LoadedModel, examples: list[Example], template: str = "chat", max_length: int = 128,
              batch_size: int = 16) -> float:
    """Mean response-token loss of ``lm`` on ``examples`` (what :func:`train_sft` minimises)."""
    tok = lm.tokenizer
    encoded = [e for e in (encode_example(tok, ex, template, max_length) for ex in examples) if e is not None]
    collate = PadCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, multiple=1)
    was_training = lm.model.training
    lm.model.eval()
    total, count = 0.0, 0
    for s in range(0, len(encoded), batch_size):
        batch = collate(encoded[s:s + batch_size])
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                 labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        total += loss.item()
        count += int((labels != IGNORE_INDEX).sum())
    lm.model.train(was_training)
    return total / max(count, 1)
