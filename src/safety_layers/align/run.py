"""Safety-align a chat model by supervised fine-tuning, and build the aligned demo model.

The bundled SmolLM2-135M-Instruct answers almost every harmful request, so it has no safety
layers to find. :func:`align` teaches a model to refuse with data we wrote:

- malicious training prompts, each paired with a refusal drawn (seeded) from the refusals
  written for its harm category or for any category; a ``{topic}`` placeholder is filled
  with the category's topic phrase, and templates whose topic is unknown are skipped. The
  bundled refusals vary in what they say but all open with "Sorry", a word no benign answer
  starts with: refusing is then one decision at the reply's first token instead of one
  spread over tokens that answers share ("I can't" / "I'm glad"), and it generalises better;
- optionally *recovery* examples (Qi et al. 2024, "Safety alignment should be made more than
  just a few tokens deep"): the reply opens like compliance ("Sure, here's how") and then
  refuses. The opener is context only (no loss), so the model learns to return to a refusal
  after a compliant start, never to produce one;
- benign prompts paired with the base model's own greedy answers (self-distillation, so the
  model keeps its abilities and its voice). A prompt whose answer the keyword judge reads as
  a refusal is answered again with the reply opened helpfully (``reopen``), and dropped only
  if that too is refused: the base model's own over-refusals are never taught, and the
  benign prompts nearest the boundary, which it balks at, are not lost;
- held-out prompts that training never sees, on which the refusal rates are measured.

The loss covers the response tokens only, optionally weighted per kind (``benign_weight``)
and on each reply's first tokens (``opening_weight``), where a greedy reply is decided to
be a refusal or an answer. ``unlikelihood_weight`` adds, per training prompt, the
unlikelihood (Welleck et al. 2019) of an opening of the other kind: -log(1 - P(opening))
for a refusal's opening after a benign prompt and a compliant one after a malicious prompt.
The prompt prefix every example shares (the chat template's system turn, a third of a short
SmolLM2 example) is run once per step without gradient and its keys and values reused by the
batch (``prefix_cache``): the loss is unchanged, the gradient drops only the paths through
those keys and values. Training happens in memory; the model is written
once, atomically, with its ``align_manifest.json`` (recipe, data counts, seed, refusal rates).
An interrupted run leaves no model folder; rerunning restarts training and reuses the
self-distilled answers, which the generation cache keeps on disk.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from ..core.errors import SafetyLayersError
from ..engine.generation import cache_kwargs, output_cache
from ..core.layers import LayerRange
from ..core.models import LoadedModel, cache_dir, find_blocks, load_or_use
from ..core.prompts import render, resolve_template

ALIGN_DATA = "data/align"
#: Bundled files (under ``safety_layers/data/align``) used when a data field is None.
BUNDLED = {"malicious": "malicious_train.jsonl", "benign": "benign_train.jsonl", "refusals": "refusals.jsonl",
           "heldout_malicious": "heldout_malicious.jsonl", "heldout_benign": "heldout_benign.jsonl"}
MANIFEST = "align_manifest.json"
#: Held-out prompt fields the refusal rates are broken down by, where a prompt file has them.
GROUP_FIELDS = ("category", "form")

#: Topic phrases that fill a refusal's ``{topic}`` ("I cannot assist with {topic}."): they
#: must read after "for" and "with". Categories without one (self-harm, other) skip such
#: refusals; a prompt record's own ``topic`` field overrides the table.
CATEGORY_TOPICS = {
    "weapons": "making or modifying weapons",
    "violence": "hurting other people",
    "cybercrime": "hacking or malware",
    "fraud": "fraud or scams",
    "drugs": "making or misusing drugs",
    "hate": "hateful or extremist content",
    "privacy": "tracking people or exposing their private information",
}

#: Compliant openings for recovery examples. Generic on purpose: none is the implicit
#: attack's "Sure, the answer is:", which is kept for measuring robustness.
COMPLIANT_OPENERS = (
    "Sure, here's how", "Sure! Here are the steps:", "Of course.", "Certainly! Here is",
    "Absolutely, here you go:", "Step 1:", "Here's a detailed guide:", "Okay, so first",
    "No problem. To do this,", "Great question! The first thing",
)

#: Reply openings for benign prompts the base model refuses (see :func:`self_distill`).
#: Neutral on purpose: none resembles the implicit attack's "Sure, the answer is:".
REOPENERS = ("Here's what I can tell you:", "Good question!", "Happy to help.", "Here's a short answer:")

Method = Literal["full", "lora"]


# --------------------------------------------------------------------------- configuration

@dataclass
class AlignConfig:
    """One alignment recipe (``safety-layers align``). Data fields left None use the bundled files."""

    model: str = field(default="smollm2-135m-instruct", metadata={"help": "base chat model to align"})
    out: str | None = field(default=None, metadata={"help": "output folder (None: ./aligned-<model>)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})
    malicious: str | None = field(default=None, metadata={"help": "JSONL of malicious training prompts (prompt, category)"})
    benign: str | None = field(default=None, metadata={"help": "JSONL of benign training prompts (prompt, category)"})
    refusals: str | None = field(default=None, metadata={"help": "JSONL of refusals (text, categories)"})
    heldout_malicious: str | None = field(default=None, metadata={
        "help": "held-out malicious prompts (None: the bundled split for bundled data, else heldout_fraction of the training file)"})
    heldout_benign: str | None = field(default=None, metadata={"help": "held-out benign prompts (as heldout_malicious)"})
    heldout_fraction: float = field(default=0.2, metadata={"help": "share of a custom training file held out when no held-out file is given"})
    n_malicious: int | None = field(default=None, metadata={"help": "use a seeded sample of this many malicious training prompts"})
    n_benign: int | None = field(default=None, metadata={"help": "use a seeded sample of this many benign training prompts"})
    borderline: bool = field(default=True, metadata={"help": "train on benign prompts of category 'borderline' (safe but alarming-sounding)"})
    recovery_fraction: float = field(default=0.0, metadata={"help": "share of malicious prompts also trained as compliant opener + refusal"})
    reopen: bool = field(default=True, metadata={
        "help": "answer a benign prompt the base model refuses again, the reply started by a helpful opening, "
                "instead of dropping it"})
    answer_tokens: int = field(default=56, metadata={"help": "length of the self-distilled benign answers (greedy new tokens)"})
    template: str = field(default="chat", metadata={"help": "prompt template (chat falls back to plain without a chat template)"})
    method: Method = field(default="full", metadata={"help": "full fine-tuning or LoRA (merged into the weights when saved)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the training examples (fractions allowed)"})
    lr: float = field(default=3e-5, metadata={"help": "peak learning rate (AdamW, linear warmup and decay)"})
    batch_size: int = field(default=16, metadata={"help": "examples per optimizer step"})
    max_length: int = field(default=128, metadata={"help": "most tokens per example (prompt + response); responses are cut"})
    warmup: float = field(default=0.1, metadata={"help": "share of steps with linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    benign_weight: float = field(default=1.0, metadata={
        "help": "loss weight of the benign answers relative to the refusals (>1 pushes against over-refusal)"})
    opening_weight: float = field(default=1.0, metadata={
        "help": "loss weight of each reply's first opening_tokens tokens, where a reply turns into a refusal or "
                "an answer (1: plain mean)"})
    opening_tokens: int = field(default=4, metadata={"help": "reply tokens that opening_weight covers"})
    unlikelihood_weight: float = field(default=0.0, metadata={
        "help": "weight of the unlikelihood term: each training prompt also gets an opening of the other kind "
                "(a refusal's for benign prompts, a compliant one for malicious prompts) whose probability is "
                "pushed down, -log(1 - P(opening)) (0: off)"})
    frozen_layers: str | None = field(default=None, metadata={
        "help": "decoder blocks left untouched while aligning, 0-based inclusive, e.g. 0-14 (None: train all)"})
    prefix_cache: bool = field(default=True, metadata={
        "help": "compute the prompt prefix every example shares (the chat template's system turn) once per "
                "step, without gradient through it: same loss, about a third fewer tokens on SmolLM2"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (method=lora)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (method=lora)"})
    seed: int = field(default=0, metadata={"help": "seed for sampling, refusal choice, shuffling and initialisation"})
    evaluate: bool = field(default=True, metadata={"help": "measure refusal on the held-out prompts after training"})
    eval_tokens: int = field(default=48, metadata={"help": "greedy new tokens per held-out prompt when measuring refusal"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        if self.method not in ("full", "lora"):
            raise SafetyLayersError(f"method must be 'full' or 'lora', got {self.method!r}")
        for name in ("lr", "epochs", "benign_weight", "opening_weight"):
            if not getattr(self, name) > 0:
                raise SafetyLayersError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.unlikelihood_weight >= 0:
            raise SafetyLayersError(f"unlikelihood_weight must be >= 0, got {self.unlikelihood_weight}")
        for name in ("batch_size", "answer_tokens", "eval_tokens", "lora_r", "lora_alpha", "opening_tokens"):
            if getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 16:
            raise SafetyLayersError(f"max_length must be >= 16 tokens, got {self.max_length}")
        for name in ("heldout_fraction", "warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.recovery_fraction <= 1:
            raise SafetyLayersError(f"recovery_fraction must be in [0, 1], got {self.recovery_fraction}")
        if self.frozen_layers is not None:
            LayerRange.parse(self.frozen_layers)  # a malformed range fails now, not after distilling
        for name in ("n_malicious", "n_benign"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SafetyLayersError(f"{name} must be >= 1 or None (all), got {getattr(self, name)}")

    def sft(self) -> "SFTSettings":
        return SFTSettings(method=self.method, lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                           max_length=self.max_length, warmup=self.warmup, weight_decay=self.weight_decay,
                           lora_r=self.lora_r, lora_alpha=self.lora_alpha, seed=self.seed,
                           prefix_cache=self.prefix_cache, kind_weights={"benign": self.benign_weight},
                           opening_tokens=self.opening_tokens, opening_weight=self.opening_weight,
                           unlikelihood_weight=self.unlikelihood_weight, frozen_layers=self.frozen_layers)


@dataclass
class SFTSettings:
    """How :func:`train_sft` optimises: AdamW, linear warmup then linear decay to zero."""

    method: Method = "full"
    lr: float = 3e-5
    epochs: float = 2.0
    batch_size: int = 16
    max_length: int = 128
    warmup: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    prefix_cache: bool = True     # run the prefix all examples share once per step, without gradient
    kind_weights: dict = field(default_factory=dict)   # loss weight per Example.kind, e.g. {"benign": 2.0}
    opening_tokens: int = 4       # how many first reply tokens opening_weight covers
    opening_weight: float = 1.0   # loss weight of those tokens, where refuse-or-answer is decided
    unlikelihood_weight: float = 0.0   # weight of -log(1 - P(Example.avoid)) against the response loss
    frozen_layers: str | None = None   # blocks (0-based inclusive range) whose parameters stay fixed
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0


@dataclass
class Example:
    """One training pair. ``prefix`` is reply text the model sees but is not trained to write."""

    prompt: str
    response: str
    kind: str                     # "refusal" | "recovery" | "benign" (or a caller's own label)
    category: str = ""
    prefix: str = ""
    finished: bool = True         # False: the response was cut off, so no end-of-turn token is taught
    avoid: str = ""               # an opening made unlikely after the prompt (SFTSettings.unlikelihood_weight)


@dataclass
class AlignData:
    """Training examples and the held-out prompts, with counts of what was kept and dropped."""

    train: list[Example]
    heldout_malicious: list[str]
    heldout_benign: list[str]
    counts: dict
    heldout_labels: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # per prompt: category, form


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


@dataclass
class AlignResult:
    """What :func:`align` produced: the folder, the recipe, the data counts and refusal rates."""

    out: str
    base_model: str
    base_fingerprint: str
    fingerprint: str
    template: str
    config: dict
    counts: dict
    train: dict
    refusal: dict                 # e.g. {"heldout_malicious": 0.97, "heldout_benign": 0.02, ...}
    seconds: dict
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- data

def _bundled(name: str) -> Path:
    return Path(str(resources.files("safety_layers") / ALIGN_DATA / BUNDLED[name]))


def load_records(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL file that each carry ``fields``; a one-line error names the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise SafetyLayersError(f"alignment data file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SafetyLayersError(f"{path}:{n} is not valid JSON ({e.msg}): one JSON object per line") from None
        missing = [f for f in fields if not isinstance(row, dict) or not row.get(f)]
        if missing:
            raise SafetyLayersError(f"{path}:{n} lacks {', '.join(missing)}: each line needs {', '.join(fields)}")
        rows.append(row)
    return rows


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def refusal_pool(refusals: list[dict], category: str, topic: str | None) -> list[str]:
    """Refusals written for ``category`` or for ``any``, ``{topic}`` filled (or the template skipped)."""
    pool = []
    for r in refusals:
        if category not in r["categories"] and "any" not in r["categories"]:
            continue
        text = r["text"]
        if "{topic}" in text:
            if not topic:
                continue
            text = text.replace("{topic}", topic)
        pool.append(text)
    return pool


def refusal_examples(records: list[dict], refusals: list[dict], rng: random.Random,
                     recovery_fraction: float = 0.0) -> list[Example]:
    """Pair each malicious prompt with a refusal of its category; add recovery examples."""
    out = []
    for row in records:
        cat = row.get("category", "")
        pool = refusal_pool(refusals, cat, row.get("topic") or CATEGORY_TOPICS.get(cat))
        if not pool:
            raise SafetyLayersError(f"no refusal fits category {cat!r} (prompt {row['prompt'][:40]!r}): "
                                    "add refusals with that category or 'any' to the refusals file")
        out.append(Example(row["prompt"], rng.choice(pool), "refusal", cat))
    n_recovery = round(recovery_fraction * len(records))
    for row in rng.sample(records, n_recovery):
        cat = row.get("category", "")
        pool = refusal_pool(refusals, cat, row.get("topic") or CATEGORY_TOPICS.get(cat))
        out.append(Example(row["prompt"], rng.choice(pool), "recovery", cat, prefix=rng.choice(COMPLIANT_OPENERS)))
    return out


def opening_words(text: str, n: int = 2) -> str:
    """The first ``n`` words of ``text``, trailing punctuation dropped ("I'm sorry, but" -> "I'm sorry")."""
    return " ".join(text.split()[:n]).rstrip(",.:;!?")


def assign_avoid(examples: list[Example], rng: random.Random) -> None:
    """Give each benign example a refusal opening to avoid, drawn from the refusals being
    trained (so as often as the model learns each one), and each refusal example a compliant
    opening (:data:`COMPLIANT_OPENERS`). Recovery examples, which start compliant, get none."""
    refusal_openings = [opening_words(e.response) for e in examples if e.kind == "refusal"]
    for e in examples:
        if e.kind == "benign" and refusal_openings:
            e.avoid = rng.choice(refusal_openings)
        elif e.kind == "refusal":
            e.avoid = opening_words(rng.choice(COMPLIANT_OPENERS))


def _split(rows: list[dict], fraction: float, rng: random.Random) -> tuple[list[dict], list[dict]]:
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    k = round(fraction * len(rows))
    held = set(idx[:k])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _sources(cfg: AlignConfig, kind: str) -> tuple[list[dict], list[dict], str]:
    """(training rows, held-out rows, description) for ``kind`` in malicious / benign."""
    train_path = getattr(cfg, kind)
    held_path = getattr(cfg, f"heldout_{kind}")
    rows = load_records(train_path or _bundled(kind), ("prompt",))
    if held_path is not None:
        return rows, load_records(held_path, ("prompt",)), f"{train_path or 'bundled'} / held out: {held_path}"
    if train_path is None:
        return rows, load_records(_bundled(f"heldout_{kind}"), ("prompt",)), "bundled / held out: bundled split"
    rows, held_rows = _split(rows, cfg.heldout_fraction, random.Random(f"{cfg.seed}-split-{kind}"))
    return rows, held_rows, f"{train_path} / held out: {cfg.heldout_fraction:.0%} of it"


def heldout_rows(cfg: AlignConfig | None = None) -> tuple[list[dict], list[dict]]:
    """The held-out (malicious, benign) rows of a recipe (``prompt`` and, where the file has
    them, ``category`` / ``form``): what its refusal rates are measured on."""
    cfg = cfg or AlignConfig()
    return _sources(cfg, "malicious")[1], _sources(cfg, "benign")[1]


def heldout_prompts(cfg: AlignConfig | None = None) -> tuple[list[str], list[str]]:
    """The held-out (malicious, benign) prompts of a recipe."""
    mal, ben = heldout_rows(cfg)
    return [r["prompt"] for r in mal], [r["prompt"] for r in ben]


def build_data(cfg: AlignConfig, lm: LoadedModel, min_train: int = 8, min_heldout: int = 4) -> AlignData:
    """Load, split and pair the alignment data; self-distil the benign answers (cached)."""
    rng = random.Random(cfg.seed)
    mal_rows, held_mal_rows, mal_src = _sources(cfg, "malicious")
    ben_rows, held_ben_rows, ben_src = _sources(cfg, "benign")
    held_mal = [r["prompt"] for r in held_mal_rows]
    held_ben = [r["prompt"] for r in held_ben_rows]
    refusals = load_records(cfg.refusals or _bundled("refusals"), ("text", "categories"))

    # Leak guard: a prompt that is also held out never reaches training.
    held = {_norm(p) for p in held_mal + held_ben}
    n_before = len(mal_rows) + len(ben_rows)
    mal_rows = [r for r in mal_rows if _norm(r["prompt"]) not in held]
    ben_rows = [r for r in ben_rows if _norm(r["prompt"]) not in held]
    leaked = n_before - len(mal_rows) - len(ben_rows)
    n_borderline = sum(r.get("category") == "borderline" for r in ben_rows)
    if not cfg.borderline:
        ben_rows = [r for r in ben_rows if r.get("category") != "borderline"]
    if cfg.n_malicious is not None and cfg.n_malicious < len(mal_rows):
        mal_rows = rng.sample(mal_rows, cfg.n_malicious)
    if cfg.n_benign is not None and cfg.n_benign < len(ben_rows):
        ben_rows = rng.sample(ben_rows, cfg.n_benign)

    for what, n, need in (("malicious training prompts", len(mal_rows), min_train),
                          ("benign training prompts", len(ben_rows), min_train)):
        if n < need:
            raise SafetyLayersError(f"only {n} {what} remain after the held-out split; at least {need} are "
                                    "needed: add prompts, lower heldout_fraction or pass a held-out file")
    if cfg.evaluate:
        for what, n in (("held-out malicious", len(held_mal)), ("held-out benign", len(held_ben))):
            if n < min_heldout:
                raise SafetyLayersError(f"only {n} {what} prompts; at least {min_heldout} are needed to measure "
                                        "refusal: pass a larger held-out file or evaluate=False")

    train = refusal_examples(mal_rows, refusals, rng, cfg.recovery_fraction)
    benign, dropped, reopened = self_distill(lm, [r["prompt"] for r in ben_rows], cfg.answer_tokens,
                                             cfg.template, cfg.progress, cfg.reopen)
    for row, ex in zip(ben_rows, benign):
        if ex is not None:
            ex.category = row.get("category", "")
            train.append(ex)
    if cfg.unlikelihood_weight > 0:
        assign_avoid(train, random.Random(f"{cfg.seed}-avoid"))
    counts = {"malicious_train": len(mal_rows), "refusal_examples": sum(e.kind == "refusal" for e in train),
              "recovery_examples": sum(e.kind == "recovery" for e in train),
              "benign_train": len(ben_rows), "benign_examples": sum(e.kind == "benign" for e in train),
              "benign_dropped_refused": dropped,
              "benign_reopened": reopened, "borderline_available": n_borderline,
              "borderline_used": sum(e.kind == "benign" and e.category == "borderline" for e in train),
              "refusal_texts": len({e.response for e in train if e.kind != "benign"}),
              "removed_as_heldout": leaked, "heldout_malicious": len(held_mal), "heldout_benign": len(held_ben),
              "sources": {"malicious": mal_src, "benign": ben_src, "refusals": cfg.refusals or "bundled"}}
    labels = {"heldout_malicious": [prompt_labels(r) for r in held_mal_rows],
              "heldout_benign": [prompt_labels(r) for r in held_ben_rows]}
    return AlignData(train, held_mal, held_ben, counts, labels)


def prompt_labels(row: dict) -> dict[str, str]:
    """The fields of a prompt row that refusal rates are broken down by (:data:`GROUP_FIELDS`)."""
    return {k: str(row[k]) for k in GROUP_FIELDS if row.get(k) not in (None, "")}


def self_distill(lm: LoadedModel, prompts: list[str], tokens: int, template: str = "chat",
                 progress: bool = True, reopen: bool = True) -> tuple[list[Example | None], int, int]:
    """The model's own greedy answers as benign examples.

    A prompt the model refuses (keyword judge) is, with ``reopen``, answered again with the
    reply started by a helpful opening (:data:`REOPENERS`), since the benign prompts a base
    model balks at are the ones nearest the refusal boundary and the most informative to
    train on. Still refused: None. Returns (examples, dropped, reopened).
    """
    from ..engine.generation import GenerationSettings, generate
    from ..judges.refusal import get_judge

    judge = get_judge("keyword")
    settings = GenerationSettings(max_new_tokens=tokens)
    comps = generate(lm, prompts, settings, template=template, progress=progress)
    verdicts = judge.judge(prompts, [c.text for c in comps])
    out: list[Example | None] = [None if v.refused else Example(p, c.text.strip(), "benign", finished=c.finished)
                                 for p, c, v in zip(prompts, comps, verdicts)]
    again = [i for i, e in enumerate(out) if e is None]
    reopened = 0
    if reopen and again:
        opens = [REOPENERS[k % len(REOPENERS)] for k in range(len(again))]
        retry = generate(lm, [prompts[i] for i in again], settings, template=template, progress=False,
                         reply_start=opens)
        replies = [o + c.text for o, c in zip(opens, retry)]
        for i, reply, c, v in zip(again, replies, retry, judge.judge([prompts[i] for i in again], replies)):
            if not v.refused:
                out[i] = Example(prompts[i], reply.strip(), "benign", finished=c.finished)
                reopened += 1
    return out, sum(e is None for e in out), reopened


# --------------------------------------------------------------------------- tokenisation

@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]             # -100 where no loss (prompt, prefix)
    weight: float = 1.0           # loss weight of each of its response tokens
    negative: bool = False        # the labels are an opening to make unlikely, not a reply to learn


def encode_example(tokenizer, ex: Example, template: str, max_length: int) -> Encoded | None:
    """Token ids with loss on the response only; None if the prompt leaves no room for a reply.

    Prompt, prefix and response are tokenized separately and concatenated, so the mask
    boundary is exact whatever the tokenizer merges. A response cut to fit ``max_length``
    gets no end-of-turn token (the model must not learn to stop mid-sentence).
    """
    r = render(tokenizer, ex.prompt, template)
    prompt_ids = tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]
    lead = " " if resolve_template(tokenizer, template) == "plain" else ""
    prefix_ids = tokenizer(lead + ex.prefix, add_special_tokens=False)["input_ids"] if ex.prefix else []
    gap = " " if ex.prefix else lead
    resp_ids = tokenizer(gap + ex.response, add_special_tokens=False)["input_ids"]
    if ex.finished:
        resp_ids = resp_ids + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids) - len(prefix_ids)
    if room < min(8, len(resp_ids)):
        return None
    if len(resp_ids) > room:
        resp_ids = resp_ids[:room]
    context = prompt_ids + prefix_ids
    return Encoded(context + resp_ids, [-100] * len(context) + resp_ids)


def avoid_row(tokenizer, ex: Example, template: str, max_length: int) -> Encoded | None:
    """The prompt followed by ``ex.avoid`` as a negative row (None without one, or if it does not fit)."""
    if not ex.avoid:
        return None
    e = encode_example(tokenizer, Example(ex.prompt, ex.avoid, ex.kind, finished=False), template, max_length)
    if e is not None:
        e.negative = True
    return e


def _collate(batch: list[Encoded], pad_id: int, opening: tuple[int, float] = (0, 1.0)) -> dict[str, torch.Tensor]:
    """Right-padded tensors, plus per-token loss ``weights`` [batch, width] when any row is
    weighted or ``opening = (k, w)`` weighs each reply's first k labels by w."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(e.negative for e in batch):
        out["negative"] = torch.tensor([e.negative for e in batch])
    k, w = opening
    opening_on = k > 0 and w != 1.0
    if opening_on or any(e.weight != 1.0 for e in batch):
        weights = torch.tensor([e.weight for e in batch], dtype=torch.float32)[:, None].expand(-1, width)
        if opening_on:
            labelled = labels != -100
            weights = weights * torch.where(labelled & (labelled.cumsum(1) <= k), w, 1.0)
        out["weights"] = weights
    return out


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


# --------------------------------------------------------------------------- training

def _lora_targets(blocks) -> list[str]:
    """Module names (last path part) of every attention and MLP matrix, from the ArchSpec."""
    return sorted({p.split(".")[-1] for p in blocks.spec.components.values()})


def response_loss(model, batch: dict[str, torch.Tensor], prefix: torch.Tensor | None = None,
                  unlikelihood_weight: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy over the labelled (response) tokens, as ``model(**batch).loss``.

    Rows flagged ``negative`` carry an opening to avoid instead: each adds
    ``unlikelihood_weight`` x -log(1 - P(opening | prompt)), averaged over those rows.

    The LM head runs only where a label is: on a small model with a large vocabulary
    (SmolLM2: 576 -> 49,152) the head over every position is a fifth of a training step, and
    prompts are half the tokens. Models with logit soft-capping take the plain path.

    ``prefix`` (1-D ids that every row of ``batch`` starts with, e.g. the chat template's
    system turn) is run once without gradient and its keys and values are shared by the
    batch, which then starts after it. The loss is the same; the gradient leaves out only the
    paths through the prefix's own keys and values.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    weights = batch.get("weights")
    negative = batch.get("negative")
    if head is None or getattr(base.config, "final_logit_softcapping", None):
        if weights is None and negative is None:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        keep = labels[:, 1:] != -100
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        return _loss_of_kept(logits, labels[:, 1:], keep, None if weights is None else weights[:, 1:][keep],
                             negative, unlikelihood_weight)
    kwargs = {}
    if prefix is not None and len(prefix):
        n = len(prefix)
        with torch.no_grad():
            cache = output_cache(base.base_model(input_ids=prefix[None].to(ids.device), use_cache=True))
        cache.batch_repeat_interleave(ids.shape[0])
        ids, labels = ids[:, n:], labels[:, n:]
        if weights is not None:
            weights = weights[:, n:]
        kwargs = cache_kwargs(cache)
    hidden = base.base_model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    labels = labels[:, 1:]
    keep = labels != -100
    logits = head(hidden[:, :-1][keep])
    return _loss_of_kept(logits, labels, keep, None if weights is None else weights[:, 1:][keep],
                         negative, unlikelihood_weight)


def _loss_of_kept(logits, labels, keep, weights, negative, unlikelihood_weight: float) -> torch.Tensor:
    """Response loss of the kept tokens, plus the unlikelihood of the negative rows' openings."""
    if negative is None or not negative.any():
        return _token_ce(logits, labels[keep], weights)
    rows = keep.nonzero()[:, 0]
    neg = negative.to(rows.device)[rows]
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")
    w = torch.ones_like(ce) if weights is None else weights.to(ce.device).float()
    loss = (ce[~neg] * w[~neg]).sum() / w[~neg].sum() if (~neg).any() else ce.sum() * 0
    logp = -torch.zeros(len(negative), device=ce.device).index_add(0, rows[neg], ce[neg])[negative]
    return loss + unlikelihood_weight * -_log1mexp(logp.clamp(max=-1e-4)).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate both near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _token_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the kept tokens; with ``weights`` (one per kept token) a weighted mean."""
    if weights is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    w = weights.to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * w).sum() / w.sum()


def shared_prefix(encoded: list["Encoded"], min_tokens: int = 8) -> list[int]:
    """The longest run of ids every example starts with, within the unlabelled context
    (one token short of it, so the position that predicts the first label stays in the batch)."""
    first = encoded[0].input_ids
    n = min(next((i for i, x in enumerate(e.labels) if x != -100), len(e.labels)) for e in encoded) - 1
    for e in encoded[1:]:
        k = 0
        while k < n and e.input_ids[k] == first[k]:
            k += 1
        n = k
    return first[:n] if n >= min_tokens else []


def train_sft(lm: LoadedModel, examples: list[Example], settings: SFTSettings | None = None, *,
              template: str = "chat", progress: bool = True,
              callback: Callable[[int, float, Any], None] | None = None) -> TrainStats:
    """Fine-tune ``lm`` in place on ``examples`` (loss on responses only).

    ``callback(step, loss, model)`` runs after every optimizer step (1-based ``step``), e.g. to
    measure refusal along the way; it may switch the model to eval mode, training mode is
    restored after it returns.

    ``method="lora"`` trains rank-``lora_r`` adapters on every attention and MLP matrix
    and merges them into the weights afterwards, so ``lm.model`` stays a plain model.
    Reproducible for a given seed, thread count and machine.
    """
    from tqdm.auto import tqdm

    s = settings or SFTSettings()
    tok = lm.tokenizer
    if tok.eos_token_id is None:
        raise SafetyLayersError("the tokenizer has no EOS token, so the model cannot learn to end a reply: "
                                "set tokenizer.eos_token to its end-of-turn token")
    encoded = [encode_example(tok, ex, template, s.max_length) for ex in examples]
    dropped = sum(e is None for e in encoded)
    kept = [(e, ex) for e, ex in zip(encoded, examples) if e is not None]
    for e, ex in kept:
        e.weight = float(s.kind_weights.get(ex.kind, 1.0))
    encoded = [e for e, _ in kept]
    negatives = [avoid_row(tok, ex, template, s.max_length) if s.unlikelihood_weight > 0 else None for _, ex in kept]
    if not encoded:
        raise SafetyLayersError(f"no example fits in max_length={s.max_length} tokens: raise max_length")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    torch.manual_seed(s.seed)
    model = lm.model
    if s.method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                                 target_modules=_lora_targets(lm.blocks)))
    if s.frozen_layers is not None:
        for i in LayerRange.parse(s.frozen_layers).check(len(lm.blocks.layers)).indices:
            lm.blocks.layers[i].requires_grad_(False)   # with LoRA: its adapters there too
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in lm.model.parameters())
    steps_per_epoch = math.ceil(len(encoded) / s.batch_size)
    total = max(1, math.ceil(s.epochs * steps_per_epoch))
    warm = math.ceil(s.warmup * total)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (total - k) / max(1, total - warm)))

    prefix = torch.tensor(shared_prefix(encoded), dtype=torch.long) if s.prefix_cache else None
    gen = torch.Generator().manual_seed(s.seed)
    lengths = [len(e.input_ids) for e in encoded]
    plan: list[list[int]] = []
    while len(plan) < total:
        plan += _batches(len(encoded), lengths, s.batch_size, gen)
    plan = plan[:total]

    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    epoch_losses, running, tokens, trained = [], [], 0, 0
    bar = tqdm(plan, desc=f"align ({s.method})", unit="step", disable=not progress, leave=False)
    try:
        for k, idx in enumerate(bar):
            rows = [encoded[i] for i in idx] + [negatives[i] for i in idx if negatives[i] is not None]
            batch = _collate(rows, pad_id, (s.opening_tokens, s.opening_weight))
            loss = response_loss(model, batch, prefix, s.unlikelihood_weight)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            running.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
            trained += int((batch["labels"] != -100).sum())
            bar.set_postfix(loss=f"{running[-1]:.3f}")
            if callback is not None:
                callback(k + 1, running[-1], model)
                model.train()
            if (k + 1) % steps_per_epoch == 0 or k + 1 == total:
                epoch_losses.append(sum(running) / len(running))
                running = []
    finally:
        bar.close()
        model.train(was_training)
    if s.method == "lora":
        lm.model = model.merge_and_unload()
        lm.blocks = find_blocks(lm.model)
    lm.model.eval()
    for p in lm.model.parameters():
        p.requires_grad_(True)
    return TrainStats(steps=total, examples=len(encoded), tokens=tokens, trained_tokens=trained,
                      dropped_too_long=dropped, epoch_losses=epoch_losses, seconds=time.perf_counter() - t0,
                      trainable_parameters=n_train, total_parameters=n_total)


@torch.no_grad()
def mean_loss(lm: LoadedModel, examples: list[Example], template: str = "chat", max_length: int = 128,
              batch_size: int = 16) -> float:
    """Mean response-token loss of ``lm`` on ``examples`` (what :func:`train_sft` minimises)."""
    tok = lm.tokenizer
    encoded = [e for e in (encode_example(tok, ex, template, max_length) for ex in examples) if e is not None]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    was_training = lm.model.training
    lm.model.eval()
    total, count = 0.0, 0
    for s in range(0, len(encoded), batch_size):
        batch = _collate(encoded[s:s + batch_size], pad_id)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                                 labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += loss.item()
        count += int((labels != -100).sum())
    lm.model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------- evaluation

def refusal_rate(lm: LoadedModel, prompts: list[str], max_new_tokens: int = 48, template: str = "chat",
                 progress: bool = True, labels: list[dict[str, str]] | None = None) -> dict:
    """Share of greedy replies the keyword judge (opening mode) counts as refusals
    (:func:`evaluate.refusal_rate`, reduced to the counts the align manifest keeps). With
    per-prompt ``labels`` (e.g. ``{"category": "hate", "form": "short"}``) the counts are also
    broken down under ``by`` (see :func:`breakdown`)."""
    from ..evaluate import refusal_rate as over_refusal
    from ..engine.generation import GenerationSettings

    r = over_refusal(lm, prompts, judges=("keyword",), settings=GenerationSettings(max_new_tokens=max_new_tokens),
                     template=template, progress=progress)
    out = {"n": r.n, "refused": r.count, "rate": r.count / max(r.n, 1)}
    if labels:
        by = breakdown([v.refused for v in r.verdicts["keyword"]], labels)
        if by:
            out["by"] = by
    return out


def breakdown(refused: list[bool], labels: list[dict[str, str]]) -> dict[str, dict[str, dict]]:
    """Refusal counts per value of each label field: ``{"category": {"hate": {"n", "refused",
    "rate"}, ...}, "form": {...}}``. A field no prompt carries is left out; prompts without it
    count under ``"(none)"``. Where a recipe is weak is more use than its overall rate."""
    if len(refused) != len(labels):
        raise ValueError(f"{len(refused)} verdicts but {len(labels)} label rows")
    out: dict[str, dict[str, dict]] = {}
    for key in dict.fromkeys(k for row in labels for k in row):
        groups: dict[str, list[bool]] = {}
        for flag, row in zip(refused, labels):
            groups.setdefault(row.get(key, "(none)"), []).append(bool(flag))
        out[key] = {g: {"n": len(v), "refused": sum(v), "rate": sum(v) / len(v)} for g, v in sorted(groups.items())}
    return out


# --------------------------------------------------------------------------- align

def _default_out(model: str) -> Path:
    from ..core.runs import slug
    return Path(f"aligned-{slug(model)}")


def _save_with_manifest(lm: LoadedModel, out: Path, manifest: dict, overwrite: bool) -> Path:
    """Model, tokenizer and manifest appear together, or not at all: they are written into a
    hidden sibling folder that is renamed into place last."""
    from ..core.models import save_model
    from ..core.runs import write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.align.", dir=out.parent))
    try:
        save_model(lm.model, lm.tokenizer, stage / "m", overwrite=True)
        write_json(stage / "m" / MANIFEST, manifest)
        if out.exists():
            if not overwrite:
                raise SafetyLayersError(f"{out} appeared while training: choose another folder or pass --overwrite")
            shutil.rmtree(out)
        os.replace(stage / "m", out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def align(cfg: AlignConfig | None = None, *, model=None, manifest: dict | None = None) -> AlignResult:
    """Safety-align ``cfg.model`` (or an already loaded ``model``) and save it to ``cfg.out``.

    Returns an :class:`AlignResult`; the same facts, plus the environment and any extra
    ``manifest`` fields, go into ``<out>/align_manifest.json``.
    """
    from ..core.runs import environment

    cfg = cfg or AlignConfig()
    t0 = time.perf_counter()
    out = Path(cfg.out) if cfg.out else _default_out(cfg.model)
    if out.exists() and not cfg.overwrite:
        raise SafetyLayersError(f"{out} exists: choose another output folder or pass --overwrite")
    lm = load_or_use(model if model is not None else cfg.model)
    if cfg.frozen_layers is not None:  # before minutes of distilling, not after
        LayerRange.parse(cfg.frozen_layers).check(len(lm.blocks.layers))
    notes = []
    template = resolve_template(lm.tokenizer, cfg.template)
    if template != cfg.template:
        notes.append(f"{lm.name} has no chat template: trained and evaluated with the '{template}' template, "
                     "which every command falls back to for this model")
    base_fp = lm.fingerprint()

    t = time.perf_counter()
    data = build_data(cfg, lm)
    t_data = time.perf_counter() - t
    stats = train_sft(lm, data.train, cfg.sft(), template=template, progress=cfg.progress)

    refusal: dict = {}
    t = time.perf_counter()
    if cfg.evaluate:
        for key in ("heldout_malicious", "heldout_benign"):
            refusal[key] = refusal_rate(lm, getattr(data, key), cfg.eval_tokens, template, cfg.progress,
                                        labels=data.heldout_labels.get(key))
        refusal["judge"] = "keyword (opening)"
        refusal["max_new_tokens"] = cfg.eval_tokens
    t_eval = time.perf_counter() - t
    seconds = {"data_and_distill": round(t_data, 1), "train": round(stats.seconds, 1), "evaluate": round(t_eval, 1)}

    result = AlignResult(
        out=str(out), base_model=lm.name if model is not None else cfg.model, base_fingerprint=base_fp,
        fingerprint=lm.fingerprint(), template=template, config=asdict(cfg), counts=data.counts,
        train=asdict(stats), refusal=refusal, seconds=seconds, notes=notes)
    t = time.perf_counter()
    record = {"kind": "safety-layers aligned model", **asdict(result), "environment": environment(),
              **(manifest or {})}
    _save_with_manifest(lm, out, record, cfg.overwrite)
    result.seconds["save"] = round(time.perf_counter() - t, 1)
    result.seconds["total"] = round(time.perf_counter() - t0, 1)
    return result


def read_manifest(folder: str | Path) -> dict | None:
    """The ``align_manifest.json`` of an aligned model folder, or None if it has none."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
