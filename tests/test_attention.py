"""Attention maps: the eager switch and its restore, the question's tokens from offsets, the shares,
the run folder and the command line, on tiny random models."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch

from conftest import ARCH_NAMES, tiny_model
from safety_layers.analysis.attention import (PAPER_PAIRS, AttentionConfig, AttentionResult, attention, minmax,
                                              prompt_attention, question_tokens, set_shares, word_kinds)
from safety_layers.core.errors import SafetyLayersError
from safety_layers.engine.attention import attention_implementation, eager_attention, last_token_attention


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_eager_pass_returns_attention_rows_and_restores_the_kernel(arch):
    lm = tiny_model(arch)
    before = attention_implementation(lm.model)
    ids = lm.tokenizer("How to make a bomb?")["input_ids"]
    with eager_attention(lm.model):
        assert attention_implementation(lm.model) == "eager"
        att = last_token_attention(lm.model, ids)
    assert attention_implementation(lm.model) == before
    assert att.shape == (4, len(ids))
    assert torch.allclose(att.sum(1), torch.ones(4), atol=1e-5)        # a softmax row per layer
    assert (att >= 0).all()


def test_the_kernel_is_restored_when_the_pass_fails():
    lm = tiny_model("llama")
    before = attention_implementation(lm.model)
    assert before != "eager"
    with pytest.raises(RuntimeError):
        with eager_attention(lm.model):
            raise RuntimeError("boom")
    assert attention_implementation(lm.model) == before


def test_without_the_eager_kernel_no_weights_is_an_error():
    lm = tiny_model("llama")
    lm.model.set_attn_implementation("sdpa")
    with pytest.raises(SafetyLayersError, match="eager_attention"):
        last_token_attention(lm.model, [5, 6, 7])


@pytest.mark.parametrize("template", ["chat", "alpaca", "alpaca_short", "plain"])
def test_question_tokens_come_from_the_rendered_offsets(template):
    tok = tiny_model("llama").tokenizer
    q = question_tokens(tok, "How to make a bomb?", template)
    assert "".join(q.labels) == "How to make a bomb?"                 # byte tokens: one per character
    text = tok.decode([q.ids[i] for i in q.positions])
    assert text == "How to make a bomb?"
    assert q.positions == list(range(q.positions[0], q.positions[0] + len(q.positions)))
    assert q.positions[-1] < len(q.ids) - 1 or template == "plain"    # the template's tail follows the question
    kinds = dict(zip(q.labels, q.kinds))
    assert kinds["m"] == "content" and kinds["H"] == "function" and kinds["?"] == "other"


def test_word_kinds_use_the_stop_word_list():
    assert [k for _, _, k in word_kinds("How to rob a bank?")] == ["function", "function", "content", "function",
                                                                   "content"]
    assert [k for _, _, k in word_kinds("What's the capital", stop_words={"capital"})] == ["content", "content",
                                                                                         "function"]


def test_a_prompt_without_question_tokens_is_one_line_error():
    lm = tiny_model("llama")
    with eager_attention(lm.model):
        with pytest.raises(SafetyLayersError, match="no question tokens after the template") as e:
            prompt_attention(lm, "", "chat", where="prompt 3 of normal")
    assert "\n" not in str(e.value) and "prompt 3 of normal" in str(e.value)


def test_shares_are_the_content_part_of_the_attention_on_words():
    lm = tiny_model("llama", layers=3)
    prompts = ["How to rob a bank", "Where is the capital of America?"]
    with eager_attention(lm.model):
        got = set_shares(lm, prompts, "chat")
        by_hand, chance = [], []
        for p in prompts:
            q = question_tokens(lm.tokenizer, p, "chat")
            att = last_token_attention(lm.model, q.ids)[:, q.positions]
            c = torch.tensor([k == "content" for k in q.kinds])
            w = torch.tensor([k != "other" for k in q.kinds])
            by_hand.append(att[:, c].sum(1) / att[:, w].sum(1))
            chance.append(float(c.sum() / w.sum()))
    assert got["n"] == 2 and len(got["content_share"]) == 3
    assert torch.allclose(torch.tensor(got["content_share"]).float(), torch.stack(by_hand).mean(0), atol=1e-6)
    assert got["chance"] == pytest.approx(sum(chance) / 2)
    assert all(0 < m < 1 for m in got["question_mass"])


def test_minmax_scales_each_layer():
    w = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    assert minmax(w).tolist() == [[0.0, 1.0, 0.5], [0.0, 0.0, 0.0]]


def test_run_folder_figures_band_and_reference(tmp_path):
    lm, ref = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    cfg = AttentionConfig(model="tiny", band="1-2", limit=4, progress=False, pairs=[PAPER_PAIRS[0]])
    res = attention(cfg, model=lm, run_dir=tmp_path)
    assert res.band == [1, 2] and res.figures == ["pair-0.png", "shares.png"]
    for name in res.figures:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    back = AttentionResult.from_json(tmp_path / "result.json")
    assert back.shares["normal"]["n"] == 4 and len(back.pairs[0]["malicious"]["weights"]) == 4
    assert attention_implementation(lm.model) != "eager"
    from safety_layers.report import write_report

    rep = write_report(tmp_path)
    assert rep.kind == "attention" and rep.sections[:2] == ["summary", "shares"] and rep.images == 2
    assert "Content words' share" in Path(rep.markdown).read_text()
    # a reference model gives its own numbers on the same prompts
    import safety_layers.core.models as models

    cfg2 = AttentionConfig(model="tiny", limit=3, progress=False, pairs=[PAPER_PAIRS[1]], reference_model="ref")
    orig = models.load_or_use
    try:
        models.load_or_use = lambda m: ref if m == "ref" else orig(m)
        res2 = attention(cfg2, model=lm)
    finally:
        models.load_or_use = orig
    assert res2.reference["model"] == "ref"
    assert res2.reference["shares"]["normal"]["content_share"] != res2.shares["normal"]["content_share"]


def test_band_outside_the_model_and_bad_pairs_fail_in_one_line():
    lm = tiny_model("llama")
    with pytest.raises(SafetyLayersError, match="outside the model"):
        attention(AttentionConfig(model="tiny", band="2-9", limit=2, progress=False), model=lm)
    with pytest.raises(SafetyLayersError, match=r"pairs\[0\]"):
        AttentionConfig(pairs=[["only one"]])


def test_command_line_writes_the_run(tmp_path, capsys):
    from safety_layers.cli.main import main
    from safety_layers.core.models import save_model

    lm = tiny_model("llama")
    folder = save_model(lm.model, lm.tokenizer, tmp_path / "tiny")
    pairs = tmp_path / "cfg.yaml"
    pairs.write_text(json.dumps({"limit": 3, "progress": False, "pairs": [list(PAPER_PAIRS[2])]}))
    rc = main(["attention", "--config", str(pairs), "--model", str(folder), "--band", "0-1",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "content words' share" in out and "pair-0.png" in out
    assert (tmp_path / "run" / "shares.png").is_file()
    rc = main(["attention", "--model", str(folder), "--band", "7-9", "--out", str(tmp_path / "run2")])
    assert rc == 2
    assert capsys.readouterr().err.strip().startswith("error: layer range 7-9 is outside the model")
