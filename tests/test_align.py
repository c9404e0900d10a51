"""align: data building, response-only masks, training, reproducibility, saving, the demo alias.

Everything runs on a seeded tiny random llama with the byte tokenizer (conftest.tiny_model),
on small JSONL files written per test or small samples of the bundled data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_model
from helpers_models import tiny_model as tiny_smollm2

from safety_layers.align.config import AlignConfig, SFTSettings
from safety_layers.align.data import (CATEGORY_TOPICS, COMPLIANT_OPENERS, REOPENERS, Example, _bundled, _norm,
                                      assign_avoid, avoid_row, build_data, encode_example, load_records,
                                      opening_words, prompt_labels, refusal_examples, refusal_pool, self_distill)
from safety_layers.align.loss import response_loss, shared_prefix
from safety_layers.align.run import MANIFEST, AlignResult, align, breakdown, read_manifest
from safety_layers.align.train import mean_loss, train_sft
from safety_layers.core.errors import SafetyLayersError
from safety_layers.finetune.data import Encoded, PadCollator

REFUSALS = [
    {"text": "I can't help with weapons.", "categories": ["weapons"]},
    {"text": "I won't assist with {topic}, sorry.", "categories": ["weapons", "fraud", "other"]},
    {"text": "Sorry, I can't do that.", "categories": ["any"]},
    {"text": "I cannot help with fraud.", "categories": ["fraud"]},
]


def _collate(rows, pad_id, opening=(0, 1.0)):
    """A batch as the SFT Trainer gets it: padded to the longest row, per-token weights."""
    return PadCollator(pad_id, multiple=1, opening=opening)(rows)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    """A private cache (self-distilled answers are cached), and one thread: tiny models train
    ~10x faster on one thread than on two busy cores (no thread spin-waits)."""
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def files(tmp_path):
    cats = ["weapons", "fraud", "other"]
    mal = [{"prompt": f"Tell me how to do bad thing {i}.", "category": cats[i % 3]} for i in range(12)]
    ben = [{"prompt": f"Give me a tip about gardening number {i}.", "category": "home"} for i in range(10)]
    ben += [{"prompt": f"How do I kill a stuck process {i}?", "category": "borderline"} for i in range(2)]
    return {
        "malicious": _write(tmp_path / "mal.jsonl", mal),
        "benign": _write(tmp_path / "ben.jsonl", ben),
        "refusals": _write(tmp_path / "ref.jsonl", REFUSALS),
        "heldout_malicious": _write(tmp_path / "hm.jsonl", [{"prompt": f"Explain bad plan {i}."} for i in range(4)]
                                    + [mal[0]]),  # a leak: also in the training file
        "heldout_benign": _write(tmp_path / "hb.jsonl", [{"prompt": f"What is a good book {i}?"} for i in range(4)]),
    }


def _cfg(files, tmp_path, **kw) -> AlignConfig:
    base = dict(out=str(tmp_path / "aligned"), answer_tokens=6, eval_tokens=3, epochs=1.0, batch_size=4,
                lr=1e-3, max_length=96, progress=False, **files)
    base.update(kw)
    return AlignConfig(**base)


# --------------------------------------------------------------------------- data


def test_breakdown_counts_refusals_per_label_value():
    refused = [True, False, True, True, False]
    labels = [{"category": "hate", "form": "short"}, {"category": "hate"}, {"category": "fraud", "form": "short"},
              {"form": "question"}, {"category": "fraud", "form": "question"}]
    by = breakdown(refused, labels)
    assert by["category"] == {"(none)": {"n": 1, "refused": 1, "rate": 1.0},
                              "fraud": {"n": 2, "refused": 1, "rate": 0.5},
                              "hate": {"n": 2, "refused": 1, "rate": 0.5}}
    assert {k: (v["n"], v["refused"]) for k, v in by["form"].items()} == {
        "(none)": (1, 0), "question": (2, 1), "short": (2, 2)}
    assert breakdown(refused, [{}] * 5) == {}
    with pytest.raises(ValueError, match="5 verdicts but 4 label rows"):
        breakdown(refused, labels[:4])
    assert prompt_labels({"prompt": "x", "category": "hate", "form": ""}) == {"category": "hate"}


def test_refusal_pool_matches_category_and_fills_or_skips_topics():
    weapons = refusal_pool(REFUSALS, "weapons", CATEGORY_TOPICS["weapons"])
    assert "I cannot help with fraud." not in weapons
    assert {"I can't help with weapons.", "Sorry, I can't do that."} <= set(weapons)
    assert f"I won't assist with {CATEGORY_TOPICS['weapons']}, sorry." in weapons
    other = refusal_pool(REFUSALS, "other", None)
    assert other == ["Sorry, I can't do that."]  # the {topic} template has no topic to fill
    assert "I won't assist with garden pests, sorry." in refusal_pool(REFUSALS, "other", "garden pests")


def test_bundled_refusals_fit_every_malicious_prompt_category():
    refusals = load_records(_bundled("refusals"), ("text", "categories"))
    rows = load_records(_bundled("malicious"), ("prompt", "category"))
    rng = random.Random(0)
    examples = refusal_examples(rows, refusals, rng, recovery_fraction=0.25)
    plain = [e for e in examples if e.kind == "refusal"]
    recovery = [e for e in examples if e.kind == "recovery"]
    assert len(plain) == len(rows) and len(recovery) == round(0.25 * len(rows))
    for e in examples:
        assert "{topic}" not in e.response
        assert e.response in refusal_pool(refusals, e.category, CATEGORY_TOPICS.get(e.category))
    assert all(e.prefix in COMPLIANT_OPENERS for e in recovery)
    assert len({e.response for e in plain}) > 40  # varied, not one template
    self_harm = {e.response for e in plain if e.category == "self-harm"}
    assert not any("hacking" in r or "weapons" in r.lower() for r in self_harm)


def test_build_data_keeps_heldout_out_of_training(files, tmp_path):
    lm = tiny_model()
    data = build_data(_cfg(files, tmp_path), lm)
    train_prompts = {e.prompt for e in data.train}
    assert not train_prompts & set(data.heldout_malicious + data.heldout_benign)
    assert data.counts["removed_as_heldout"] == 1
    assert data.counts["malicious_train"] == 11 and data.counts["refusal_examples"] == 11
    kinds = [e.kind for e in data.train]
    assert kinds.count("benign") == data.counts["benign_examples"] == 12 - data.counts["benign_dropped_refused"]
    assert data.counts["borderline_used"] == 2
    no_border = build_data(_cfg(files, tmp_path, borderline=False), lm)
    assert no_border.counts["borderline_used"] == 0 and no_border.counts["benign_train"] == 10


def test_custom_file_without_heldout_is_split_by_fraction(files, tmp_path):
    lm = tiny_model()
    cfg = _cfg({**files, "heldout_malicious": None}, tmp_path, heldout_fraction=0.34)
    data = build_data(cfg, lm)
    assert len(data.heldout_malicious) == 4 and data.counts["malicious_train"] == 8
    assert not {e.prompt for e in data.train} & set(data.heldout_malicious)
    again = build_data(cfg, lm)
    assert again.heldout_malicious == data.heldout_malicious  # the split follows the seed


def test_bundled_heldout_never_reaches_training():
    lm = tiny_model()
    cfg = AlignConfig(n_malicious=30, n_benign=8, answer_tokens=2, progress=False)
    data = build_data(cfg, lm)
    held = {_norm(p) for p in data.heldout_malicious + data.heldout_benign}
    assert len(data.heldout_malicious) >= 100 and len(data.heldout_benign) >= 100
    assert not {_norm(e.prompt) for e in data.train} & held
    assert data.counts["refusal_examples"] == 30


@pytest.mark.parametrize("change,match", [
    ({"heldout_fraction": 0.5, "heldout_malicious": None}, "only 6 malicious training prompts"),
    ({"n_benign": 3}, "only 3 benign training prompts"),
])
def test_not_enough_data_is_one_line_error(files, tmp_path, change, match):
    cfg = _cfg({**files, **{k: v for k, v in change.items() if k in files}}, tmp_path,
               **{k: v for k, v in change.items() if k not in files})
    with pytest.raises(SafetyLayersError, match=match) as e:
        build_data(cfg, tiny_model())
    assert "\n" not in str(e.value)


def test_bad_inputs_are_one_line_errors(files, tmp_path):
    with pytest.raises(SafetyLayersError, match="method"):
        AlignConfig(method="qlora")
    with pytest.raises(SafetyLayersError, match="recovery_fraction"):
        AlignConfig(recovery_fraction=1.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"category": "x"}\n')
    with pytest.raises(SafetyLayersError, match="bad.jsonl line 2 lacks prompt"):
        load_records(bad, ("prompt",))
    only_weapons = _write(tmp_path / "r.jsonl", [REFUSALS[0]])
    with pytest.raises(SafetyLayersError, match="no refusal fits category 'fraud'"):
        build_data(_cfg({**files, "refusals": only_weapons}, tmp_path), tiny_model())


# --------------------------------------------------------------------------- masks

def test_encode_example_puts_loss_on_the_response_only():
    tok = byte_tokenizer()
    ex = Example("Hi there?", "Hello!", "benign")
    enc = encode_example(tok, ex, "chat", 200)
    n_ctx = enc.labels.count(-100)
    prompt_text = tok.decode(enc.input_ids[:n_ctx])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "Hi there?" in prompt_text
    assert all(lab == -100 for lab in enc.labels[:n_ctx])
    assert enc.labels[n_ctx:] == enc.input_ids[n_ctx:]
    assert tok.decode(enc.input_ids[n_ctx:]) == "Hello!</s>"

    rec = encode_example(tok, Example("Hi there?", "I can't.", "recovery", prefix="Sure,"), "chat", 200)
    n_ctx = rec.labels.count(-100)
    assert tok.decode(rec.input_ids[:n_ctx]).endswith("assistant\nSure,")  # the opener carries no loss
    assert tok.decode(rec.input_ids[n_ctx:]) == " I can't.</s>"

    cut = encode_example(tok, Example("Hi?", "x" * 100, "benign"), "chat", 60)
    assert len(cut.input_ids) == 60 and cut.input_ids[-1] != tok.eos_token_id  # cut replies teach no stop
    unfinished = encode_example(tok, Example("Hi?", "abc", "benign", finished=False), "chat", 200)
    assert unfinished.input_ids[-1] != tok.eos_token_id
    assert encode_example(tok, Example("y" * 80, "abc", "benign"), "chat", 60) is None


def test_plain_template_fallback_without_chat_template(files, tmp_path):
    lm = tiny_model()
    lm.tokenizer = byte_tokenizer(chat=False)
    enc = encode_example(lm.tokenizer, Example("Hi?", "Yes.", "benign"), "chat", 100)
    n_ctx = enc.labels.count(-100)
    assert lm.tokenizer.decode(enc.input_ids[:n_ctx]).endswith("User: Hi?\nAssistant:")
    assert lm.tokenizer.decode(enc.input_ids[n_ctx:]) == " Yes.</s>"
    res = align(_cfg(files, tmp_path, evaluate=False, epochs=0.25), model=lm)
    assert res.template == "plain" and "no chat template" in res.notes[0]


# --------------------------------------------------------------------------- training

def _examples(n=12):
    return [Example(f"Question {i}?", "I can't help with that." if i % 2 else f"Answer {i} is fine.",
                       "refusal" if i % 2 else "benign") for i in range(n)]


@pytest.mark.parametrize("method,lr,drop", [("full", 3e-3, 0.3), ("lora", 3e-2, 0.1)])
def test_training_changes_weights_and_lowers_loss(method, lr, drop):
    lm = tiny_model()
    ex = _examples()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    loss0 = mean_loss(lm, ex)
    stats = train_sft(lm, ex, SFTSettings(method=method, lr=lr, epochs=6, batch_size=4, warmup=0.0,
                                                             lora_r=2),
                         progress=False)
    assert stats.steps == 18 and len(stats.epoch_losses) == 6
    assert mean_loss(lm, ex) < loss0 - drop
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed)
    assert set(lm.model.state_dict()) == set(before)  # LoRA merged away: a plain model again
    if method == "lora":
        assert stats.trainable_parameters < stats.total_parameters / 5
        assert not any("embed" in k for k in changed)


@pytest.mark.parametrize("method,lr", [("full", 3e-3), ("lora", 3e-2)])
def test_frozen_layers_stay_fixed_while_the_rest_trains(method, lr):
    lm = tiny_model()
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train_sft(lm, _examples(), SFTSettings(method=method, lr=lr, epochs=1, batch_size=4, lora_r=2,
                                                 frozen_layers="0-0"), progress=False)
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(".layers.0." in k for k in changed)
    assert any(".layers.1.self_attn" in k for k in changed)
    assert all(p.requires_grad for p in lm.model.parameters())  # handed back trainable
    with pytest.raises(SafetyLayersError, match="1-9 is outside the model"):
        train_sft(tiny_model(), _examples(), SFTSettings(frozen_layers="1-9"), progress=False)


def test_refused_benign_prompts_are_answered_again_with_a_helpful_opening(monkeypatch):
    from safety_layers import judges
    from safety_layers.judges import Verdict

    class Picky:  # refuses every reply without a helpful opening, and every reply to "stubborn"
        def judge(self, prompts, texts):
            return [Verdict(refused="stubborn" in p or not t.startswith(REOPENERS)) for p, t in zip(prompts, texts)]

    monkeypatch.setattr(judges, "get_judge", lambda name: Picky())
    lm = tiny_model()
    prompts = ["Name a fruit.", "A stubborn question?", "Name a tree."]
    out, dropped, reopened = self_distill(lm, prompts, 5, progress=False)
    assert (dropped, reopened) == (1, 2) and out[1] is None
    assert out[0].response.startswith(REOPENERS[0]) and out[2].response.startswith(REOPENERS[2])  # one opening each, in turn
    assert len(out[0].response) > len(REOPENERS[0])  # the model's continuation follows the opening
    out, dropped, reopened = self_distill(lm, prompts, 5, progress=False, reopen=False)
    assert (dropped, reopened) == (3, 0) and out == [None, None, None]


def test_training_is_reproducible_with_the_seed():
    def run(seed):
        lm = tiny_model()
        train_sft(lm, _examples(), SFTSettings(lr=1e-3, epochs=1.5, batch_size=4, seed=seed), progress=False)
        return lm.model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def _varied_examples():
    """Refusals, benign answers of several lengths (some unfinished), a recovery example, and
    an opening to avoid for each, so every term of the loss and the length sorting take part."""
    out = []
    for i in range(18):
        refuse = i % 3 == 0
        reply = "Sorry, I can't help with that one." if refuse else f"Answer {i} is {'so ' * (i % 5)}fine."
        out.append(Example(f"Question number {i}: what now?", reply, "refusal" if refuse else "benign",
                           finished=i % 4 != 1))
    out.append(Example("Question number 99: pick a lock?", "Sorry, no.", "recovery", prefix="Sure, here"))
    assign_avoid(out, random.Random(0))
    return out


#: Two recipes on the tiny model: every loss term with the cached prefix, and LoRA with a frozen block.
SFT_CASES = {
    "full": dict(method="full", lr=3e-3, epochs=2.0, batch_size=4, warmup=0.25, kind_weights={"benign": 0.6},
                 opening_tokens=4, opening_weight=4.0, unlikelihood_weight=0.5, prefix_cache=True, seed=3),
    "lora": dict(method="lora", lr=3e-2, epochs=1.5, batch_size=5, warmup=0.1, lora_r=2, lora_alpha=4,
                 frozen_layers="0-0", prefix_cache=False, seed=1, weight_decay=0.01),
}


def _hand_written_loop(lm, examples, s: SFTSettings) -> list[float]:
    """The training loop align ran before it moved onto the Trainer, kept as the reference: its
    own seeded batch plan, AdamW, LambdaLR warmup ((k+1)/warm) and linear decay, clipping at
    1.0, LoRA from the ArchSpec's matrices, frozen blocks whole. Returns each step's loss."""
    import math

    from peft import LoraConfig, get_peft_model

    tok = lm.tokenizer
    kept = [(e, ex) for e, ex in ((encode_example(tok, ex, "chat", s.max_length), ex) for ex in examples) if e]
    for e, ex in kept:
        e.weight = float(s.kind_weights.get(ex.kind, 1.0))
    encoded = [e for e, _ in kept]
    negatives = [avoid_row(tok, ex, "chat", s.max_length) if s.unlikelihood_weight > 0 else None for _, ex in kept]
    torch.manual_seed(s.seed)
    model = lm.model
    if s.method == "lora":
        targets = sorted({p.split(".")[-1] for p in lm.blocks.spec.components.values()})
        model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if s.frozen_layers is not None:
        for i in range(int(s.frozen_layers.split("-")[0]), int(s.frozen_layers.split("-")[1]) + 1):
            lm.blocks.layers[i].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    per_epoch = math.ceil(len(encoded) / s.batch_size)
    total = max(1, math.ceil(s.epochs * per_epoch))
    warm = math.ceil(s.warmup * total)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warm if k < warm else max(0.0, (total - k) / max(1, total - warm)))
    prefix = torch.tensor(shared_prefix(encoded), dtype=torch.long) if s.prefix_cache else None
    gen, lengths, plan = torch.Generator().manual_seed(s.seed), [len(e.input_ids) for e in encoded], []
    while len(plan) < total:
        order, window, batches = torch.randperm(len(encoded), generator=gen).tolist(), s.batch_size * 8, []
        for a in range(0, len(encoded), window):
            chunk = sorted(order[a:a + window], key=lambda i: lengths[i])
            batches += [chunk[j:j + s.batch_size] for j in range(0, len(chunk), s.batch_size)]
        plan += [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    model.train()
    losses = []
    for idx in plan[:total]:
        rows = [encoded[i] for i in idx] + [negatives[i] for i in idx if negatives[i] is not None]
        loss = response_loss(model, _collate(rows, tok.pad_token_id, (s.opening_tokens, s.opening_weight)), prefix,
                             s.unlikelihood_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if s.method == "lora":
        lm.model = model.merge_and_unload()
    return losses


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_the_trainer_reproduces_the_hand_written_loop_bit_for_bit(case):
    """The aligned demo model must not change with the move onto the Trainer: the same batches
    in the same order, the same loss each step, the same optimizer, schedule, clipping and
    seeding give the same weights, bit for bit."""
    s = SFTSettings(**SFT_CASES[case])
    ref = tiny_model("llama", layers=2, seed=11)
    ref_losses = _hand_written_loop(ref, _varied_examples(), s)
    lm = tiny_model("llama", layers=2, seed=11)
    stats = train_sft(lm, _varied_examples(), s, progress=False)
    assert stats.losses == ref_losses and stats.steps == len(ref_losses)
    assert not lm.model.training and lm.model.config.use_cache   # handed back as it came, in eval mode
    want = ref.model.state_dict()
    got = lm.model.state_dict()
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


#: The old loop's numbers on the cases above (recorded from it before the move; CPU float
#: results vary a little between machines, hence the tolerance).
RECORDED = {"full": ([5.584165, 5.505603, 5.426089, 5.472524, 5.293457, 5.175793, 5.002043, 5.026024, 4.877042,
                      4.823648], 4860, 1322, 158.676894),
            "lora": ([5.582332, 5.552866, 5.461567, 5.439781, 5.398949, 5.395865], 2178, 776, 154.314870)}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_training_matches_numbers_recorded_from_the_old_loop(case):
    lm = tiny_model("llama", layers=2, seed=11)
    stats = train_sft(lm, _varied_examples(), SFTSettings(**SFT_CASES[case]), progress=False)
    losses, tokens, trained, checksum = RECORDED[case]
    assert stats.losses == pytest.approx(losses, rel=1e-3)
    assert (stats.tokens, stats.trained_tokens) == (tokens, trained)
    assert sum(float(v.double().sum()) for v in lm.model.state_dict().values()) == pytest.approx(checksum, rel=1e-4)


# --------------------------------------------------------------------------- align and save

def test_align_saves_a_folder_plain_transformers_loads(files, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = tiny_model()
    res = align(_cfg(files, tmp_path), model=lm)
    out = Path(res.out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    manifest = read_manifest(out)
    assert manifest["config"]["seed"] == 0 and manifest["counts"]["malicious_train"] == 11
    assert manifest["refusal"]["heldout_malicious"]["n"] == 5 and manifest["refusal"]["heldout_benign"]["n"] == 4
    assert manifest["fingerprint"] != manifest["base_fingerprint"]
    by = manifest["refusal"]["heldout_malicious"]["by"]  # four prompts without a category, one leaked weapons one
    assert list(by) == ["category"] and {k: v["n"] for k, v in by["category"].items()} == {"(none)": 4, "weapons": 1}
    assert sum(v["refused"] for v in by["category"].values()) == manifest["refusal"]["heldout_malicious"]["refused"]
    assert "by" not in manifest["refusal"]["heldout_benign"]  # no labels in that file
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 60, 70, 80]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, lm.model(ids).logits, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left

    with pytest.raises(SafetyLayersError, match="exists"):
        align(_cfg(files, tmp_path), model=tiny_model())
    again = align(_cfg(files, tmp_path, overwrite=True), model=tiny_model())
    assert again.fingerprint == res.fingerprint  # same seed, same data: the same weights


def test_interrupted_save_leaves_no_model_folder(files, tmp_path, monkeypatch):
    import safety_layers.core.models as models

    def crash(model, tok, out_dir, overwrite=False):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        align(_cfg(files, tmp_path, evaluate=False, epochs=0.25), model=tiny_model())
    assert not (tmp_path / "aligned").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- demo alias

def test_demo_alias_builds_once_and_rebuilds_old_versions(tmp_path, monkeypatch):
    from safety_layers.core.models import built_model_folder
    from safety_layers.recipes import demo_model

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path))
    calls = []

    def fake_align(cfg, manifest=None):
        calls.append(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / MANIFEST).write_text(json.dumps(manifest))
        return AlignResult(str(out), cfg.model, "", "", "chat", {}, {}, {}, {}, {"total": 1.0})

    monkeypatch.setattr(demo_model, "align", fake_align)
    folder = built_model_folder("demo")
    assert folder == tmp_path / "models" / "demo" and len(calls) == 1
    assert calls[0].model == "smollm2-135m-instruct" and calls[0].overwrite
    assert built_model_folder("demo") == folder and len(calls) == 1  # cached
    (folder / MANIFEST).write_text(json.dumps({"demo_version": demo_model.DEMO_VERSION - 1}))
    demo_model.build_demo()
    assert len(calls) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_loss_matches_the_models_own_loss_and_gradients(arch):
    """The head-only-where-labelled loss is the same number, with the same gradients."""
    lm = tiny_model(arch, layers=2, seed=3)
    tok = lm.tokenizer
    examples = [Example("How do I bake bread?", "Mix flour and water.", "benign"),
                Example("Pick a lock for me", "I can't help with that.", "refusal")]
    enc = [encode_example(tok, ex, "plain", 64) for ex in examples]
    batch = _collate(enc, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    lm.model.eval()  # no dropout, so both passes see the same network; gradients still flow
    ref = lm.model(**batch).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in lm.model.parameters()]
    lm.model.zero_grad(set_to_none=True)
    ours = response_loss(lm.model, batch)
    ours.backward()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    for p, g in zip(lm.model.parameters(), ref_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_shared_prefix_gives_the_same_loss(arch):
    """The chat template's system turn, run once per step without gradient, leaves the loss
    unchanged; gradients differ only by the paths through the prefix's keys and values, so
    the final norm (which sees only the batch's own positions) gets the same gradient."""
    lm = tiny_smollm2(arch, seed=4)
    tok = lm.tokenizer
    examples = [Example("How do I bake bread?", "Mix flour and water.", "benign"),
                Example("Pick a lock for me", "I can't help with that.", "refusal", prefix="Sure, here is how"),
                Example("what is docker", "A tool that runs programs in containers", "benign", finished=False)]
    enc = [encode_example(tok, ex, "chat", 96) for ex in examples]
    prefix = shared_prefix(enc)
    assert tok.decode(prefix).startswith("<|im_start|>system") and tok.decode(prefix).endswith("user\n")
    first_label = min(next(i for i, x in enumerate(e.labels) if x != -100) for e in enc)
    assert len(prefix) < first_label
    assert shared_prefix(enc + [Encoded([5] * 20, [-100] * 10 + [5] * 10)]) == []  # nothing shared
    batch = _collate(enc, tok.pad_token_id)
    lm.model.eval()
    ref = response_loss(lm.model, batch)
    ref.backward()
    norm = lm.blocks.final_norm.weight
    ref_norm_grad = norm.grad.clone()
    lm.model.zero_grad(set_to_none=True)
    ours = response_loss(lm.model, batch, torch.tensor(prefix))
    ours.backward()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(norm.grad, ref_norm_grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is not None for p in lm.blocks.layers.parameters())


def test_training_with_the_cached_prefix_lowers_loss_like_without():
    losses = {}
    for cached in (False, True):
        lm = tiny_smollm2(seed=5)
        ex = _examples()
        before = mean_loss(lm, ex)
        train_sft(lm, ex, SFTSettings(lr=3e-3, epochs=4, batch_size=4, warmup=0.0, prefix_cache=cached),
                     progress=False)
        losses[cached] = (before, mean_loss(lm, ex))
    assert losses[True][0] == losses[False][0]
    assert losses[True][1] < losses[True][0] - 0.3
    assert abs(losses[True][1] - losses[False][1]) < 0.5 * (losses[False][0] - losses[False][1])


def _two_rows(arch: str, seed: int, *examples):
    """A tiny model in eval mode, its pad id, and ``examples`` encoded with the plain template."""
    lm = tiny_model(arch, layers=2, seed=seed)
    tok = lm.tokenizer
    lm.model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return lm, pad, [encode_example(tok, ex, "plain", 256) for ex in examples]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kind_weights_weight_each_rows_tokens(arch):
    """A row of weight w counts as w copies of its tokens in the mean loss."""
    lm, pad, enc = _two_rows(arch, 6, Example("How do I bake bread?", "Mix flour and water, then bake.", "benign"),
                             Example("Pick a lock for me", "I can't help with that.", "refusal"))
    with torch.no_grad():
        per_row = [response_loss(lm.model, _collate([e], pad)) for e in enc]
        counts = [sum(x != -100 for x in e.labels[1:]) for e in enc]
        plain = response_loss(lm.model, _collate(enc, pad))
        enc[0].weight = 3.0
        batch = _collate(enc, pad)
        weighted = response_loss(lm.model, batch)
    assert "weights" in batch
    expect = (3 * counts[0] * per_row[0] + counts[1] * per_row[1]) / (3 * counts[0] + counts[1])
    assert torch.allclose(weighted, expect, rtol=1e-5)
    assert abs(weighted - plain) > 1e-3  # the rows' losses differ, so the weight moves the mean
    with pytest.raises(SafetyLayersError, match="benign_weight"):
        AlignConfig(benign_weight=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_opening_weight_weights_each_replys_first_tokens(arch):
    """opening=(k, w): each reply's first k labelled tokens count w times, with or without a shared prefix."""
    lm, pad, enc = _two_rows(arch, 7, Example("Tell me: bake bread?", "Mix flour and water, then bake it.", "benign"),
                             Example("Tell me: pick a lock", "I can't help with that one.", "refusal",
                                        prefix="Sure, here"))
    enc[1].weight = 2.0
    k, w = 3, 5.0
    with torch.no_grad():
        batch = _collate(enc, pad, (k, w))
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        ce = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
        tw = []
        for row, e in zip(keep.tolist(), enc):
            seen = 0
            for kept in row:
                if kept:
                    seen += 1
                    tw.append(e.weight * (w if seen <= k else 1.0))
        tw = torch.tensor(tw)
        expect = (ce * tw).sum() / tw.sum()
        ours = response_loss(lm.model, batch)
        n = len(shared_prefix(enc))
        with_prefix = response_loss(lm.model, batch, torch.tensor(enc[0].input_ids[:n])) if n else ours
    assert batch["weights"].shape == batch["labels"].shape
    assert torch.allclose(ours, expect, rtol=1e-5)
    assert torch.allclose(with_prefix, expect, rtol=1e-4)
    assert abs(expect - (ce * torch.tensor([enc[i].weight for i, r in enumerate(keep.tolist()) for x in r if x])).sum()
               / sum(enc[i].weight for i, r in enumerate(keep.tolist()) for x in r if x)) > 1e-4
    with pytest.raises(SafetyLayersError, match="opening_weight"):
        AlignConfig(opening_weight=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_unlikelihood_rows_add_minus_log_one_minus_their_openings_probability(arch):
    """A negative row adds w * -log(1 - P(opening | prompt)); the response rows' mean is unchanged."""
    ben = Example("Tell me: bake bread?", "Mix flour and water, then bake it.", "benign", avoid="I")
    mal = Example("Tell me: pick a lock", "I can't help with that one.", "refusal", avoid="Su")
    lm, pad, enc = _two_rows(arch, 8, ben, mal)
    negs = [avoid_row(lm.tokenizer, ex, "plain", 256) for ex in (ben, mal)]
    assert all(n.negative for n in negs)
    assert avoid_row(lm.tokenizer, Example("q", "a", "benign"), "plain", 256) is None
    with torch.no_grad():
        plain = response_loss(lm.model, _collate(enc, pad))
        logps = []
        for n in negs:   # log P(opening | prompt) by teacher forcing, one row at a time
            b = _collate([n], pad)
            logits = lm.model(input_ids=b["input_ids"]).logits[0, :-1]
            lab = b["labels"][0, 1:]
            logps.append(-torch.nn.functional.cross_entropy(logits[lab != -100].float(), lab[lab != -100],
                                                            reduction="sum"))
        term = torch.stack([-torch.log1p(-lp.double().exp()).float() for lp in logps]).mean()
        w = 1.0 / float(term)   # a random model gives an opening a tiny P: scale the term to about 1
        expect = plain + w * term
        batch = _collate(enc + negs, pad)
        ours = response_loss(lm.model, batch, unlikelihood_weight=w)
        n = len(shared_prefix(enc + negs))
        with_prefix = (response_loss(lm.model, batch, torch.tensor(enc[0].input_ids[:n]), w) if n else ours)
    assert batch["negative"].tolist() == [False, False, True, True]
    assert torch.allclose(ours, expect, rtol=1e-5)
    assert torch.allclose(with_prefix, expect, rtol=1e-4)
    assert abs(float(ours - plain) - 1.0) < 1e-3
    with pytest.raises(SafetyLayersError, match="unlikelihood_weight"):
        AlignConfig(unlikelihood_weight=-1)


def test_avoid_openings_come_from_the_other_kind():
    """Benign examples avoid a refusal opening being trained; refusals avoid a compliant opening."""
    ex = [Example("p1", "I won't help with that, sorry.", "refusal"),
          Example("p2", "Sorry, I can't do that.", "refusal"),
          Example("p3", "I can't help.", "recovery", prefix="Sure, here's how"),
          Example("p4", "Bread needs flour.", "benign")]
    assign_avoid(ex, random.Random(0))
    assert ex[0].avoid in {opening_words(o) for o in COMPLIANT_OPENERS}
    assert ex[2].avoid == ""
    assert ex[3].avoid in {"I won't", "Sorry, I"}
    assert opening_words("I'm sorry, but no.") == "I'm sorry"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_loss_through_a_wrappers_forward_is_the_same(arch):
    """Under DDP, FSDP or DeepSpeed the loss runs through the wrapper's own forward (the head on
    every position some row labels); it is the direct loss, with every term and the prefix."""
    lm = tiny_smollm2(arch, seed=9)
    tok = lm.tokenizer
    examples = [Example("How do I bake bread?", "Mix flour and water.", "benign", avoid="Sorry, I"),
                Example("Pick a lock for me", "Sorry, I can't help with that.", "refusal", avoid="Sure,",
                        prefix="Sure, here is how"),
                Example("what is docker", "A tool that runs programs in containers", "benign", finished=False)]
    enc = [encode_example(tok, ex, "chat", 96) for ex in examples]
    enc[0].weight = 0.6
    negs = [n for n in (avoid_row(tok, ex, "chat", 96) for ex in examples) if n is not None]
    batch = _collate(enc + negs, tok.pad_token_id, (4, 4.0))
    prefix = torch.tensor(shared_prefix(enc + negs))
    assert len(prefix) and "negative" in batch and "weights" in batch
    lm.model.eval()
    for pre in (None, prefix):
        direct = response_loss(lm.model, batch, pre, 0.5)
        wrapped = response_loss(lm.model, batch, pre, 0.5, wrapped=True)
        assert torch.allclose(wrapped, direct, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- recipes

def test_the_demo_recipe_file_holds_the_demo_models_settings():
    from safety_layers.recipes.demo_model import demo_config

    cfg = demo_config("somewhere")
    assert (cfg.recipe, cfg.out, cfg.overwrite) == ("demo", "somewhere", True)
    expect = dict(model="smollm2-135m-instruct", method="full", n_malicious=300, recovery_fraction=0.33,
                  n_benign=600, answer_tokens=32, epochs=2.0, lr=1e-4, opening_weight=4.0, benign_weight=0.6,
                  reopen=True, seed=0, batch_size=16, warmup=0.1, max_length=128, prefix_cache=True)
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert all(type(getattr(cfg, k)) is type(v) for k, v in expect.items())   # 1e-4 read as a float


def test_explicit_settings_win_over_a_recipe_and_bad_recipes_are_one_line_errors(tmp_path):
    cfg = AlignConfig(recipe="demo", lr=3e-5, seed=2)
    assert (cfg.lr, cfg.seed, cfg.n_malicious, cfg.opening_weight) == (3e-5, 2, 300, 4.0)
    assert AlignConfig().lr == 3e-5 and AlignConfig().model == "smollm2-135m-instruct"   # no recipe: the defaults
    mine = tmp_path / "mine.yaml"
    mine.write_text("lr: 2e-4\nepochs: 1\ntraining_args: {bf16: true}\n")
    cfg = AlignConfig(recipe=str(mine), training_args={"seed": 5})
    assert (cfg.lr, cfg.epochs, cfg.training_args) == (2e-4, 1.0, {"bf16": True, "seed": 5})
    for text, match in (("lrr: 0.1\n", "did you mean 'lr'"), ("out: here\n", "unknown key 'out'"),
                        ("reopen: maybe\n", "reopen must be true or false")):
        mine.write_text(text)
        with pytest.raises(SafetyLayersError, match=match) as e:
            AlignConfig(recipe=str(mine))
        assert "\n" not in str(e.value)
    with pytest.raises(SafetyLayersError, match="unknown recipe 'dem'"):
        AlignConfig(recipe="dem")
