"""Checks on the shipped evaluation prompt sets (normal, malicious, over-rejection).

The normal and malicious sets are compared through hidden states, so they must differ in
topic, not in form: their mix of prompt forms and their lengths are held close here.
"""

import collections
import difflib
import itertools
import json
import re
from importlib import resources

import pytest

from safety_layers.core.data import load_builtin

FILES = {"normal": "normal.jsonl", "malicious": "malicious.jsonl",
         "over-rejection": "over_rejection.jsonl"}
MIN_COUNT = {"normal": 130, "malicious": 130, "over-rejection": 220}
FORMS = {"question", "imperative", "request", "roleplay", "short"}
MALICIOUS_CATEGORIES = {"weapons", "violence", "cybercrime", "fraud", "drugs", "hate",
                        "self-harm", "privacy"}


def _rows(name: str) -> list[dict]:
    text = resources.files("safety_layers").joinpath("data", FILES[name]).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return {name: _rows(name) for name in FILES}


def _norm(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: catches trivial re-spellings."""
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def _form_shares(rows: list[dict]) -> dict[str, float]:
    counts = collections.Counter(r["form"] for r in rows)
    return {f: counts[f] / len(rows) for f in FORMS}


def _mean_words(rows: list[dict]) -> float:
    return sum(len(r["prompt"].split()) for r in rows) / len(rows)


@pytest.mark.parametrize("name", list(FILES))
def test_rows_have_exactly_the_three_string_fields(sets, name):
    for i, row in enumerate(sets[name]):
        assert set(row) == {"prompt", "category", "form"}, (name, i, row)
        assert all(isinstance(v, str) and v.strip() == v and v for v in row.values()), (name, i, row)
        assert row["form"] in FORMS, (name, i, row["form"])


@pytest.mark.parametrize("name", list(FILES))
def test_minimum_size(sets, name):
    assert len(sets[name]) >= MIN_COUNT[name]


@pytest.mark.parametrize("name", list(FILES))
def test_short_form_means_under_eight_words(sets, name):
    too_long = [r["prompt"] for r in sets[name] if r["form"] == "short" and len(r["prompt"].split()) >= 8]
    assert not too_long


def test_malicious_covers_all_eight_categories_evenly(sets):
    counts = collections.Counter(r["category"] for r in sets["malicious"])
    assert set(counts) == MALICIOUS_CATEGORIES
    assert min(counts.values()) >= 15


def test_normal_and_over_rejection_span_many_categories(sets):
    assert len({r["category"] for r in sets["normal"]}) >= 10
    assert len({r["category"] for r in sets["over-rejection"]}) >= 6


def test_normal_and_malicious_share_the_form_mix(sets):
    normal, malicious = _form_shares(sets["normal"]), _form_shares(sets["malicious"])
    gaps = {f: abs(normal[f] - malicious[f]) for f in FORMS}
    assert max(gaps.values()) <= 0.10, gaps


def test_normal_and_malicious_have_similar_lengths(sets):
    n, m = _mean_words(sets["normal"]), _mean_words(sets["malicious"])
    assert abs(n - m) / max(n, m) <= 0.20, (n, m)


def test_over_rejection_has_paper_style_how_to_items(sets):
    rows = sets["over-rejection"]
    how_to = [r for r in rows if re.fullmatch(r"How to \S.*\?", r["prompt"])]
    assert 0.30 <= len(how_to) / len(rows) <= 0.60


def test_no_exact_duplicates_within_or_across_sets(sets):
    seen: dict[str, str] = {}
    dups = []
    for name, rows in sets.items():
        for r in rows:
            key = _norm(r["prompt"])
            if key in seen:
                dups.append((seen[key], name, r["prompt"]))
            seen[key] = name
    assert not dups


def test_no_near_duplicates_within_or_across_sets(sets):
    prompts = [_norm(r["prompt"]) for rows in sets.values() for r in rows]
    near = []
    for a, b in itertools.combinations(prompts, 2):
        m = difflib.SequenceMatcher(None, a, b)
        if m.real_quick_ratio() > 0.85 and m.quick_ratio() > 0.85 and m.ratio() > 0.85:
            near.append((a, b))
    assert not near


@pytest.mark.parametrize("name", list(FILES))
def test_loader_returns_every_row_with_its_metadata(sets, name):
    loaded = load_builtin(name)
    assert loaded.prompts == [r["prompt"] for r in sets[name]]
    assert [m["category"] for m in loaded.meta] == [r["category"] for r in sets[name]]
