"""Checks on the bundled alignment data (data/align/*.jsonl).

The SFT step relies on these files being varied in phrasing (forms), balanced across harm
categories, and strictly separated from the held-out evaluation splits.
"""

import csv
import difflib
import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest

import safety_layers

ALIGN_DIR = Path(safety_layers.__file__).parent / "data" / "align"

HARM_CATEGORIES = {
    "weapons", "violence", "cybercrime", "fraud", "drugs", "hate", "self-harm", "privacy", "other",
}
FORMS = {"question", "imperative", "request", "roleplay", "short", "indirect"}
PROMPT_FILES = {
    "malicious_train.jsonl": 400,
    "benign_train.jsonl": 400,
    "heldout_malicious.jsonl": 100,
    "heldout_benign.jsonl": 100,
}
#: Every bundled refusal opens with this word, which no self-distilled benign answer does, so
#: refusing or answering is decided at one reply token (README: demo v6).
REFUSAL_OPENING = "Sorry"


def _load(name: str) -> list[dict]:
    lines = (ALIGN_DIR / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _norm(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def _form_shares(rows: list[dict]) -> dict[str, float]:
    counts = Counter(r["form"] for r in rows)
    return {form: counts[form] / len(rows) for form in FORMS}


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {name: _load(name) for name in [*PROMPT_FILES, "refusals.jsonl"]}


@pytest.mark.parametrize("name", list(PROMPT_FILES))
def test_prompt_files_fields_and_counts(data, name):
    rows = data[name]
    assert len(rows) >= PROMPT_FILES[name]
    for row in rows:
        assert set(row) == {"prompt", "category", "form"}, row
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] != ""
        assert row["form"] in FORMS, row
        assert isinstance(row["category"], str) and row["category"]
    assert {r["form"] for r in rows} == FORMS
    short = [r["prompt"] for r in rows if r["form"] == "short"]
    assert all(len(p.split()) < 8 for p in short), [p for p in short if len(p.split()) >= 8]
    assert max(len(r["prompt"].split()) for r in rows) <= 60


@pytest.mark.parametrize("name,min_per_cat", [("malicious_train.jsonl", 40), ("heldout_malicious.jsonl", 10)])
def test_malicious_category_coverage(data, name, min_per_cat):
    counts = Counter(r["category"] for r in data[name])
    assert set(counts) == HARM_CATEGORIES
    assert min(counts.values()) >= min_per_cat, counts


@pytest.mark.parametrize("name,min_borderline", [("benign_train.jsonl", 70), ("heldout_benign.jsonl", 15)])
def test_benign_has_borderline_and_no_harm_labels(data, name, min_borderline):
    counts = Counter(r["category"] for r in data[name])
    assert counts["borderline"] >= min_borderline
    assert not (set(counts) & HARM_CATEGORIES)
    assert len(counts) >= 6  # many everyday topics, not one


@pytest.mark.parametrize("mal,ben", [
    ("malicious_train.jsonl", "benign_train.jsonl"),
    ("heldout_malicious.jsonl", "heldout_benign.jsonl"),
])
def test_form_mix_matches_between_malicious_and_benign(data, mal, ben):
    m, b = _form_shares(data[mal]), _form_shares(data[ben])
    for form in FORMS:
        assert abs(m[form] - b[form]) <= 0.10, (form, m[form], b[form])
        assert m[form] >= 0.10 and b[form] >= 0.10, form


def test_refusals(data):
    rows = data["refusals.jsonl"]
    assert len(rows) >= 60
    covered = set()
    for row in rows:
        assert set(row) == {"text", "categories"}, row
        text = row["text"]
        assert text.startswith(REFUSAL_OPENING), text
        placeholders = set(re.findall(r"\{([^}]*)\}", text))
        assert placeholders <= {"topic"}, text
        assert text.format(topic="that request")  # only {topic}, no stray braces
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
        assert 1 <= len(sentences) <= 4, text
        cats = row["categories"]
        assert cats and set(cats) <= HARM_CATEGORIES | {"any"}, cats
        covered |= set(cats)
    assert HARM_CATEGORIES <= covered
    assert sum(r["categories"] == ["self-harm"] for r in rows) >= 3  # supportive, not generic
    assert len({" ".join(r["text"].split()[:4]) for r in rows}) >= 15  # varied after the opening word
    assert len({_norm(r["text"]) for r in rows}) == len(rows)


def test_no_duplicates_within_or_across_files(data):
    seen: dict[str, str] = {}
    for name in PROMPT_FILES:
        for row in data[name]:
            key = _norm(row["prompt"])
            assert key not in seen, (row["prompt"], name, seen.get(key))
            seen[key] = name


def test_train_and_heldout_are_not_near_duplicates(data):
    train = [r["prompt"].lower() for n in ("malicious_train.jsonl", "benign_train.jsonl") for r in data[n]]
    held = [r["prompt"].lower() for n in ("heldout_malicious.jsonl", "heldout_benign.jsonl") for r in data[n]]
    close = []
    for h in held:
        matcher = difflib.SequenceMatcher(None, b=h, autojunk=False)  # b is the cached side
        for t in train:
            matcher.set_seq1(t)
            if matcher.real_quick_ratio() > 0.85 and matcher.quick_ratio() > 0.85 and matcher.ratio() > 0.85:
                close.append((h, t))
    assert not close, close[:5]


@pytest.mark.parametrize("name,column", [("harmful_behaviors.csv", "goal"), ("xstest_prompts.csv", "prompt")])
def test_no_exact_overlap_with_public_sets(data, shared_data, name, column):
    path = shared_data / name
    with path.open(encoding="utf-8") as f:
        public = {_norm(row[column]) for row in csv.DictReader(f)}
    ours = {_norm(r["prompt"]) for n in PROMPT_FILES for r in data[n]}
    assert not (ours & public)
