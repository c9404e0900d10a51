"""`safety-layers analyze` end to end: the real bundled model, and the CLI's error paths."""

import json

import pytest

from safety_layers.cli.main import main


@pytest.mark.slow
def test_analyze_on_the_bundled_model(tmp_path, capsys):
    out = tmp_path / "run"
    settings = tmp_path / "analyze.yaml"       # research sizes are YAML-only
    settings.write_text("pairs: 50\nbootstrap: 10\nprogress: false\n")
    rc = main(["analyze", "--model", "smollm2-135m-instruct", "--config", str(settings), "--limit", "12",
               "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["num_layers"] == 30 and result["n_normal"] == 12 and result["n_malicious"] == 12
    assert len(result["raw"]["nn_exact"]) == 30 and len(result["probe_accuracy"]) == 30
    assert all(0.0 < c <= 1.0 + 1e-9 for c in result["raw"]["nn_exact"])
    assert (out / "analysis.png").stat().st_size > 10_000
    assert json.loads((out / "env.json").read_text())["model_fingerprint"]
    text = capsys.readouterr().out
    assert "existence analysis" in text and "gap centred" in text
    # a second run into the same folder is refused without --overwrite
    assert main(["analyze", "--model", "smollm2-135m-instruct", "--limit", "3", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pairs: 10\nbogus: 1\n")
    assert main(["analyze", "--model", "smollm2-135m-instruct", "--config", str(cfg),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "bogus" in err and "allowed:" in err and "\n" not in err
    assert main(["analyze", "--model", "smollm2-135m-instruct", "--normal", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "r2")]) == 2
    assert "not found" in capsys.readouterr().err
