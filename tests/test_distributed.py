"""Two CPU processes under torchrun: sharded generation gathers to the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import tiny_model

from safety_layers.engine import distributed
from safety_layers.core.errors import SafetyLayersError
from safety_layers.engine.generation import GenerationSettings, generate
from safety_layers.core.models import save_model

TESTS = Path(__file__).resolve().parent
PROMPTS = [f"Prompt {i}: " + "tell me more " * (i % 4) + f"about item {i * 7}" for i in range(11)]


def test_shards_are_strided_and_cover_everything():
    shards = [distributed.shard_indices(11, distributed.World(r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert distributed.map_sharded(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]  # one process


def test_bad_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(SafetyLayersError, match="does not fit"):
        distributed.world()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SafetyLayersError, match="MASTER_ADDR"):
        distributed.object_group()


def test_two_processes_match_one(tmp_path):
    lm = tiny_model("llama")
    model_dir = save_model(lm.model, lm.tokenizer, tmp_path / "model")
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS))
    single = [c.text for c in generate(lm, PROMPTS, GenerationSettings(max_new_tokens=8), cache=False, progress=False)]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "SAFETY_LAYERS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "helpers_distributed.py"), str(model_dir), str(prompts_file), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["world"] == 2
        assert got["texts"] == single                   # gathered in input order, equal to one process
        assert got["evaluate_texts"] == single
        assert all(got["evaluate_cached"])              # both ranks' shards reached the shared cache
        assert got["result"] == ranks[0]["result"]      # every rank returns rank 0's result
        assert got["error"] == "judge down on rank 0"   # and rank 0's error
    assert ranks[0]["result"]["processes"] == 2 and ranks[0]["result"]["harmful"]["n"] == len(PROMPTS)
    # only rank 0 writes a run folder
    assert sorted(p.name for p in (tmp_path / "run-rank0").iterdir()) == ["config.json", "env.json", "result.json",
                                                                          "samples.jsonl"]
    assert not (tmp_path / "run-rank1").exists()
    samples = (tmp_path / "run-rank0" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["completion"] for s in samples] == single
    cache_files = list((tmp_path / "cache" / "generations").rglob("*.jsonl"))
    assert len(cache_files) == 1 and len(cache_files[0].read_text().splitlines()) == len(PROMPTS)
