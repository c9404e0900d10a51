"""The alignment data: what the model is taught to say, and the prompts it is measured on.

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

Each example becomes token ids through the fine-tuning package's :func:`encode_ids`, so
alignment and fine-tuning share one label mask and truncation rule.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..core.errors import SafetyLayersError
from ..core.models import LoadedModel
from ..core.prompts import render, resolve_template
from ..finetune.data import Encoded, encode_ids
from .config import AlignConfig

ALIGN_DATA = "data/align"
#: Bundled files (under ``safety_layers/data/align``) used when a data field is None.
BUNDLED = {"malicious": "malicious_train.jsonl", "benign": "benign_train.jsonl", "refusals": "refusals.jsonl",
           "heldout_malicious": "heldout_malicious.jsonl", "heldout_benign": "heldout_benign.jsonl"}
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


def _bundled(name: str) -> Path:
    return Path(str(resources.files("safety_layers") / ALIGN_DATA / BUNDLED[name]))


def load_records(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a data file (JSONL, JSON, CSV: :func:`core.data.read_located_rows`) that each
    carry ``fields``; a one-line error names the first bad row."""
    from ..core.data import read_located_rows

    rows = []
    for where, row in read_located_rows(path):
        missing = [f for f in fields if not isinstance(row, dict) or not row.get(f)]
        if missing:
            raise SafetyLayersError(f"{path} {where} lacks {', '.join(missing)}: each row needs {', '.join(fields)}")
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
    from ..judges import get_judge

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


# --------------------------------------------------------------------------- token ids

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
    return encode_ids(prompt_ids + prefix_ids, resp_ids, max_length, min_room=8)


def avoid_row(tokenizer, ex: Example, template: str, max_length: int) -> Encoded | None:
    """The prompt followed by ``ex.avoid`` as a negative row (None without one, or if it does not fit)."""
    if not ex.avoid:
        return None
    e = encode_example(tokenizer, Example(ex.prompt, ex.avoid, ex.kind, finished=False), template, max_length)
    if e is not None:
        e.negative = True
    return e
