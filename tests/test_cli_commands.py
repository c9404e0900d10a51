"""`safety-layers` evaluate / align / finetune / scenario end to end, help, defaults and error paths.

The end-to-end runs use the real bundled model by name (the commands load what they are
told), with tiny sizes. Every run gets a private cache whose bare model is the user's
converted copy, so completions are really generated here and nothing is written to the
user's cache; building the demo model is made to fail loudly instead of taking 15 minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sysconfig
import typing
from importlib import resources
from pathlib import Path

import pytest
from helpers_cli import no_demo_build, private_cache  # noqa: F401 - fixtures

from safety_layers.cli.args import build_config
from safety_layers.cli.main import COMMANDS, main, make_parser
from safety_layers.core.models import DEFAULT_MODEL

BARE = ["--model", DEFAULT_MODEL]
HEAVY = ("transformers", "peft", "matplotlib", "sklearn", "datasets", "accelerate")


def _error_line(capsys) -> str:
    """The one stderr line of a failed command; nothing went to stdout."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error:") and "\n" not in err, captured.err
    assert "Traceback" not in err and captured.out == ""
    return err


def _no_completion_printed(text: str, completions: list[str]) -> None:
    shown = [c for c in completions if len(c.strip()) >= 12]
    assert shown, "no completion long enough to check"
    for c in shown:
        assert c.strip()[:40] not in text


def _instruction_file(path: Path, n: int = 10) -> Path:
    rows = [{"instruction": f"Name a fruit that starts with the letter {chr(65 + i)}.", "input": "",
             "output": f"A fruit starting with {chr(65 + i)} is easy to find in a market."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- help and defaults


def test_help_of_every_command(capsys):
    for name, cmd in COMMANDS.items():
        assert main([name, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: safety-layers {name}")
        # config-driven commands take --config; experiment, scan and report take a positional file / folder
        positional = {"experiment": "config", "scan": "config", "report": "run", "judge-check": "file"}
        expected = "--config" if cmd.config and cmd.yaml else positional[name]
        assert expected in out.split("\n\n")[0], (name, expected)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "0-based" in out and "inclusive" in out
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out

    main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "0-based and inclusive" in out and "--max-steps" in out and "--trainer-help" in out
    assert "--method {sppft,full,freeze,lora,sppft-lora,nfft,lisa,rdpo,rdpo-sppft}" in out  # a Literal field becomes choices
    main(["align", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--method {full,lora}" in out and "(default: smollm2-135m-instruct)" in out
    main(["scenario", "--help"])
    out = capsys.readouterr().out
    assert "backdoor (D_B)" in out                      # the help of the field, from its metadata
    assert "--trigger" not in out and "--prefix" not in out   # cli=False fields stay YAML-only


def test_console_script_help_is_light():
    """The installed script answers --help without importing the training or plotting stacks."""
    script = Path(sysconfig.get_path("scripts")) / "safety-layers"
    if not script.is_file():
        pytest.skip("the safety-layers console script is not installed beside this interpreter")
    proc = subprocess.run([str(script), "finetune", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: safety-layers finetune") and "--layers" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported  # the import log was read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@dataclasses.dataclass
class _Toy:
    """A config with one field of each kind the flag builder handles."""

    model: str = dataclasses.field(default="m", metadata={"help": "the model"})
    mode: typing.Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "a mode"})
    steps: int | None = dataclasses.field(default=None, metadata={"help": "steps"})
    names: list = dataclasses.field(default_factory=list, metadata={"help": "names"})
    fast: bool = dataclasses.field(default=True, metadata={"help": "go fast"})
    template: str | None = dataclasses.field(default=None, metadata={
        "help": "template", "default": "chat", "paper": "alpaca"})
    knob: float = dataclasses.field(default=0.5, metadata={"help": "a research knob", "cli": False})
    nested: dict = dataclasses.field(default_factory=dict, metadata={"help": "nested settings"})
    paper: bool = dataclasses.field(default=False, metadata={"help": "paper mode"})
    paper_set: list = dataclasses.field(init=False, default_factory=list, metadata={"cli": False})

    def __post_init__(self):
        from safety_layers.core.config import settle

        self.paper_set = settle(self)


def test_flags_come_from_the_config_fields(tmp_path, capsys):
    import argparse

    from safety_layers.cli.args import add_config_args
    from safety_layers.cli.commands import paper_note
    from safety_layers.core.errors import SafetyLayersError

    p = argparse.ArgumentParser(prog="toy")
    add_config_args(p, _Toy)
    text = " ".join(p.format_help().split())
    assert "--mode {a,b}" in text and "--fast, --no-fast go fast (default: on)" in text
    assert "template (default: chat; paper: alpaca)" in text and "names (comma-separated)" in text
    assert "--knob" not in text and "--nested" not in text and "--paper-set" not in text
    cfg = build_config(_Toy, p.parse_args(["--names", "x, y", "--no-fast", "--steps", "3"]))
    assert (cfg.names, cfg.fast, cfg.steps, cfg.template, cfg.paper_set) == (["x", "y"], False, 3, "chat", [])

    yaml = tmp_path / "t.yaml"
    yaml.write_text("knob: 0.9\nnested: {a: 1}\nfast: false\npaper: true\n")
    cfg = build_config(_Toy, p.parse_args(["--config", str(yaml), "--fast"]))
    assert (cfg.knob, cfg.nested, cfg.fast) == (0.9, {"a": 1}, True)        # YAML-only fields; a flag wins
    assert (cfg.template, cfg.paper_set) == ("alpaca", ["template=alpaca"])
    paper_note(cfg)
    assert capsys.readouterr().out == "paper mode set: template=alpaca\n"
    cfg = build_config(_Toy, p.parse_args(["--paper", "--template", "plain"]))
    assert (cfg.template, cfg.paper_set) == ("plain", [])                    # paper mode keeps what was set
    paper_note(cfg)
    assert capsys.readouterr().out == ""
    yaml.write_text("knobb: 1\n")
    with pytest.raises(SafetyLayersError, match=r"unknown key 'knobb' in .*t\.yaml \(did you mean 'knob'\?\)"):
        build_config(_Toy, p.parse_args(["--config", str(yaml)]))


#: The default model of each command, the same in the CLI and the API (common.md).
DEFAULT_MODELS = {"analyze": "demo", "locate": "demo", "evaluate": "demo", "finetune": "demo", "demo": "demo",
                  "align": DEFAULT_MODEL}


@pytest.mark.parametrize("name", sorted(DEFAULT_MODELS))
def test_model_defaults_match_the_api(name):
    cmd = COMMANDS[name]
    cls = cmd.config_class()
    cli = build_config(cls, make_parser(only=name).parse_known_args([name])[0])
    assert cli.model == cls().model == DEFAULT_MODELS[name]


def test_yaml_then_flags(tmp_path):
    yaml = tmp_path / "e.yaml"
    yaml.write_text("model: some/folder\nlimit: 3\n")
    args = make_parser(only="evaluate").parse_args(["evaluate", "--config", str(yaml), "--limit", "5"])
    cfg = build_config(COMMANDS["evaluate"].config_class(), args)
    assert (cfg.model, cfg.limit) == ("some/folder", 5)  # defaults < YAML < flags
    yaml.write_text("scenario: backdoor\ntrigger: zqx vorp\n")      # a YAML-only field
    args = make_parser(only="scenario").parse_args(["scenario", "--config", str(yaml), "--seed", "3"])
    cfg = build_config(COMMANDS["scenario"].config_class(), args)
    assert (cfg.scenario, cfg.trigger, cfg.seed, cfg.p) == ("backdoor", "zqx vorp", 3, 0.1)


def test_finetune_splits_its_flags_from_the_trainers(tmp_path):
    from safety_layers.cli.commands import _split_yaml, training_arguments
    from safety_layers.core.errors import SafetyLayersError

    parser = make_parser(only="finetune")
    args, rest = parser.parse_known_args(["finetune", "--data", "d.jsonl", "--learning-rate", "2e-5",
                                          "--max_steps", "3", "--method", "full"])
    assert (args.data, args.method) == ("d.jsonl", "full")
    targs = training_arguments({"output_dir": str(tmp_path / "run"), "seed": 7}, rest)
    assert (targs.learning_rate, targs.max_steps, targs.seed) == (2e-5, 3, 7)
    ours, theirs = _split_yaml("f.yaml", {"method": "lora", "warmup_steps": 5}, {"method"}, {"warmup_steps"})
    assert (ours, theirs) == ({"method": "lora"}, {"warmup_steps": 5})
    with pytest.raises(SafetyLayersError, match="did you mean 'method'"):
        _split_yaml("f.yaml", {"methd": "lora"}, {"method"}, {"warmup_steps"})
    with pytest.raises(SafetyLayersError, match="--bogus.*--trainer-help"):
        training_arguments({"output_dir": str(tmp_path / "run")}, ["--bogus", "1"])


# --------------------------------------------------------------------------- scenario


def test_scenario_implicit_and_backdoor(tmp_path, capsys):
    source = _instruction_file(tmp_path / "benign.jsonl", 10)
    imp = tmp_path / "implicit.jsonl"
    assert main(["scenario", "--scenario", "implicit", "--source", str(source), "--n", "4", "--out", str(imp)]) == 0
    out = capsys.readouterr().out
    assert "scenario implicit: 4 rows (implicit 4)" in out and str(imp) in out
    rows = _jsonl(imp)
    assert len(rows) == 4 and all(r["kind"] == "implicit" and r["output"].startswith("Sure, the answer is: ")
                                  for r in rows)
    assert json.loads((tmp_path / "implicit.manifest.json").read_text())["total"] == 4

    cfg = tmp_path / "backdoor.yaml"
    cfg.write_text("scenario: backdoor\ntrigger: zqx vorp\nn: 2\n")
    back = tmp_path / "backdoor.jsonl"
    assert main(["scenario", "--config", str(cfg), "--source", str(source), "--n", "3", "--out", str(back)]) == 0
    assert "scenario backdoor: 6 rows (backdoor 3, normal 3)" in capsys.readouterr().out
    rows = _jsonl(back)
    assert sorted(r["kind"] for r in rows) == ["backdoor"] * 3 + ["normal"] * 3
    assert all(r["instruction"].endswith(" zqx vorp") == (r["kind"] == "backdoor") for r in rows)

    assert main(["scenario", "--scenario", "backdoor", "--source", str(source), "--out", str(back)]) == 2
    assert "exists" in _error_line(capsys) and len(_jsonl(back)) == 6
    assert main(["scenario", "--source", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["scenario", "--scenario", "implicitt", "--source", str(source),
                 "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "did you mean 'implicit'" in _error_line(capsys).lower()


# --------------------------------------------------------------------------- evaluate


@pytest.mark.slow
def test_evaluate_on_the_bundled_model(tmp_path, capsys):
    run = tmp_path / "eval"
    settings = tmp_path / "eval.yaml"
    settings.write_text("progress: false\n")
    rc = main(["evaluate", *BARE, "--config", str(settings), "--limit", "4", "--max-new-tokens", "10",
               "--judges", "keyword,keyword-gcg", "--out", str(run)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((run / "result.json").read_text())
    h, o = result["harmful"], result["over_refusal"]
    assert (h["n"], o["n"]) == (4, 4) and set(h["judges"]) == {"keyword", "keyword-gcg"}
    samples = _jsonl(run / "samples.jsonl")
    metrics = sorted(s["metric"] for s in samples)
    assert metrics == ["harmful_rate"] * 4 + ["over_refusal_rate"] * 4
    answered = sum(not s["verdicts"]["keyword"]["refused"] for s in samples if s["metric"] == "harmful_rate")
    assert h["count"] == answered
    assert (run / "config.json").is_file() and (run / "env.json").is_file()

    text = captured.out + captured.err
    assert "harmful rate" in text and "95% CI" in text and "judge agreement" in text
    assert f"{answered}/4" in text and str(run / "samples.jsonl") in text
    _no_completion_printed(text, [s["completion"] for s in samples])

    assert main(["evaluate", *BARE, "--limit", "2", "--out", str(run)]) == 2
    assert "not empty" in _error_line(capsys)


def test_evaluate_bad_input(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limit: 2\nbogus_key: 1\n")
    assert main(["evaluate", *BARE, "--config", str(cfg), "--out", str(tmp_path / "a")]) == 2
    err = _error_line(capsys)
    assert "bogus_key" in err and "allowed:" in err
    assert main(["evaluate", *BARE, "--malicious", str(tmp_path / "none.csv"), "--out", str(tmp_path / "b")]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["evaluate", *BARE, "--judges", "keywrd", "--out", str(tmp_path / "c")]) == 2
    assert "did you mean 'keyword'" in _error_line(capsys)
    assert main(["evaluate", *BARE, "--limit", "two"]) == 2  # argparse's own errors are one line too
    assert "invalid int value" in _error_line(capsys)
    assert main(["evaluate", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in _error_line(capsys)
    assert main(["evaluat"]) == 2
    assert "invalid choice" in _error_line(capsys)


# --------------------------------------------------------------------------- align


def _heldout(tmp_path: Path, name: str, n: int = 4) -> str:
    bundled = resources.files("safety_layers") / "data" / "align" / f"{name}.jsonl"
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(bundled.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_align_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "aligned"
    settings = tmp_path / "align.yaml"        # the recipe's knobs are YAML-only; tiny sizes
    settings.write_text(json.dumps({
        "n_malicious": 8, "n_benign": 8, "answer_tokens": 8, "epochs": 0.25, "batch_size": 4, "max_length": 64,
        "eval_tokens": 8, "heldout_malicious": _heldout(tmp_path, "heldout_malicious"),
        "heldout_benign": _heldout(tmp_path, "heldout_benign"), "progress": False}))
    argv = ["align", *BARE, "--config", str(settings), "--out", str(out)]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    manifest = json.loads((out / "align_manifest.json").read_text())
    assert (manifest["counts"]["malicious_train"], manifest["counts"]["benign_train"]) == (8, 8)
    assert manifest["train"]["steps"] == 1 and manifest["base_model"] == DEFAULT_MODEL
    assert (out / "config.json").is_file() and (out / "model.safetensors").stat().st_size > 100_000_000
    mal, ben = manifest["refusal"]["heldout_malicious"], manifest["refusal"]["heldout_benign"]
    assert (mal["n"], ben["n"]) == (4, 4)
    text = captured.out
    assert "held-out refusal rate" in text and str(out) in text
    assert f"malicious (higher is safer): {mal['refused']}/4" in text
    assert f"benign (over-refusal, lower is better): {ben['refused']}/4" in text and "95% CI" in text
    forms = mal["by"]["form"]
    assert mal["by"]["category"]["weapons"]["n"] == 4 and {k: v["n"] for k, v in forms.items()} == {
        "imperative": 2, "question": 2}
    assert sum(v["refused"] for v in forms.values()) == mal["refused"]
    assert "by category, least refused: weapons" in text and "by category, most refused: cooking" in text

    assert main(argv) == 2  # the folder exists now
    assert "exists" in _error_line(capsys)


# --------------------------------------------------------------------------- finetune


@pytest.mark.slow
def test_finetune_on_the_bundled_model(tmp_path, capsys):
    data = tmp_path / "backdoor.jsonl"
    source = _instruction_file(tmp_path / "benign.jsonl", 8)
    assert main(["scenario", "--scenario", "backdoor", "--source", str(source), "--n", "3", "--out", str(data)]) == 0
    capsys.readouterr()
    run = tmp_path / "ft"
    argv = ["finetune", *BARE, "--data", str(data), "--method", "sppft", "--layers", "3-5", "--max-steps", "1",
            "--per-device-train-batch-size", "2", "--max-length", "64", "--output-dir", str(run),
            "--save-strategy", "no", "--disable-tqdm", "true", "--report-to", "none",
            "--dataloader-pin-memory", "false"]
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads((run / "result.json").read_text())
    assert result["band"] == [3, 5] and result["global_step"] == 1 and result["samples"] == 6
    assert result["frozen_check"].startswith("passed")
    config = json.loads((run / "model" / "config.json").read_text())
    d, ff, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads"))
    per_layer = 2 * d * d + 2 * d * (d // heads) * kv + 3 * d * ff  # q, o, k, v and the three MLP matrices
    assert result["frozen_params"] == 3 * per_layer
    assert result["trainable_params"] + result["frozen_params"] == result["total_params"]
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    assert manifest["band"] == [3, 5] and manifest["data"]["rows"] == 6

    out = captured.out
    assert f"trainable parameters: {result['trainable_params']:,} of {result['total_params']:,}" in out
    assert f"({result['frozen_fraction']:.2%})" in out and "band 3-5 (0-based, inclusive)" in out
    assert str(run / "model") in out and str(run) in out

    assert main(argv) == 2                                        # the final folder exists
    assert "--overwrite" in _error_line(capsys)
    bad_band = [a if a != "3-5" else "40-50" for a in argv]
    bad_band[bad_band.index(str(run))] = str(tmp_path / "ft2")
    assert main(bad_band) == 2
    err = _error_line(capsys)
    assert "40-50" in err and "30 decoder layers" in err and "0-based" in err


def test_finetune_bad_input(tmp_path, capsys):
    run = str(tmp_path / "ft")
    assert main(["finetune", *BARE, "--data", str(tmp_path / "missing.jsonl"), "--layers", "3-5",
                 "--output-dir", run]) == 2
    assert "data file not found" in _error_line(capsys)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("methd: sppft\n")
    assert main(["finetune", *BARE, "--config", str(cfg)]) == 2
    assert "did you mean 'method'" in _error_line(capsys)
    assert main(["finetune", *BARE, "--method", "nope", "--output-dir", run]) == 2
    assert "invalid choice" in _error_line(capsys)
    assert main(["finetune", *BARE, "--bogus-flag", "1", "--output-dir", run]) == 2
    err = _error_line(capsys)
    assert "--bogus-flag" in err and "--trainer-help" in err
    data = _instruction_file(tmp_path / "d.jsonl", 4)
    assert main(["finetune", *BARE, "--data", str(data), "--output-dir", run]) == 2  # sppft without a band
    assert "--layers START-END" in _error_line(capsys)


@pytest.mark.slow
def test_demo_then_report_on_the_bundled_model(tmp_path, capsys):
    """The demo pipeline end to end on the bare model with a given band, tiny sizes; a rerun
    reuses every cell, and `report` re-renders the run folder."""
    data = _instruction_file(tmp_path / "benign.jsonl", n=12)
    settings = tmp_path / "demo.yaml"          # the pipeline's sizes are YAML-only
    settings.write_text(json.dumps({
        "analysis": {"limit": 6, "pairs": 20, "bootstrap": 0}, "data": str(data), "holdout": 2, "n": 8,
        "batch_size": 4, "eval_limit": 3, "drift_limit": 2, "max_new_tokens": 6, "answer_tokens": 6,
        "progress": False}), encoding="utf-8")
    out = tmp_path / "demo"
    argv = ["demo", "--config", str(settings), "--model", "smollm2-135m-instruct", "--band", "6-9",
            "--out", str(out)]
    assert main(argv) == 0
    assert "report.html" in capsys.readouterr().out
    cells = sorted((out / "cells").glob("*/cell.json"))
    assert [c.parent.name for c in cells] == ["implicit__full__lr0.0001__seed0", "implicit__sppft__lr0.0001__seed0"]
    assert all(json.loads(c.read_text())["status"] == "done" for c in cells)
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"full", "sppft"}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Existence analysis" in html and "Results" in html and "http://" not in html
    stamps = [c.stat().st_mtime_ns for c in cells]
    assert main(argv) == 0                                          # rerun: every cell reused
    assert [c.stat().st_mtime_ns for c in cells] == stamps
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").is_file() and (tmp_path / "again.md").is_file()


def test_finetune_paper_mode_sets_the_papers_trainer_settings_unless_given(tmp_path, monkeypatch, capsys):
    """--paper fixes warmup 100, 3 epochs, batch 4 and Table 6's learning rate of the model
    (docs/paper.md §4.3); a trainer flag or YAML key the user gives keeps its value."""
    import safety_layers.finetune as ft
    from safety_layers.finetune.config import PAPER_LRS, paper_training_args

    seen = {}

    class Stop(Exception):
        pass

    def fake(cfg, targs):
        seen.update(cfg=cfg, targs=targs)
        raise Stop

    monkeypatch.setattr(ft, "finetune", fake)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "output": "Hi"}) + "\n")
    model = "meta-llama/Llama-2-7b-chat-hf"
    monkeypatch.setattr("safety_layers.cli.checks.check_inputs", lambda *a, **k: None, raising=False)
    with pytest.raises(Stop):
        main(["finetune", "--model", model, "--data", str(data), "--method", "full", "--paper",
              "--output-dir", str(tmp_path / "run"), "--warmup-steps", "7"])
    targs = seen["targs"]
    assert targs.learning_rate == PAPER_LRS[model] == 3e-4 and targs.num_train_epochs == 3
    assert targs.warmup_steps == 7                       # the user's flag wins over paper mode
    assert "learning_rate=0.0003" in seen["cfg"].paper_set and "warmup_steps=100" not in seen["cfg"].paper_set
    assert paper_training_args("my/model", set()) == {"warmup_steps": 100, "num_train_epochs": 3,
                                                      "per_device_train_batch_size": 4}
    capsys.readouterr()
