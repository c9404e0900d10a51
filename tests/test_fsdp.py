"""Training at scale: gradient checkpointing through a frozen band, and FSDP on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_finetune import one_thread, run_case  # noqa: E402

TESTS = Path(__file__).resolve().parent

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*deprecated.*:FutureWarning")]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("method", ["sppft", "sppft-lora"])
def test_gradient_checkpointing_trains_through_a_frozen_band(tmp_path, method):
    """Checkpointed or not, the same steps give the same weights: gradients reach the layers below
    the frozen band (and the embedding), the band stays bit-identical and out of the optimizer."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "ckpt").mkdir()
    plain, res_a, inv_a = run_case("llama", method, "1-2", tmp_path / "plain")
    ckpt, res_b, inv_b = run_case("llama", method, "1-2", tmp_path / "ckpt", gradient_checkpointing=True)
    assert ckpt.args.gradient_checkpointing and ckpt.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert ckpt.lm.model.is_gradient_checkpointing
    for inv in (inv_a, inv_b):
        assert inv["frozen_changed"] == [] and inv["trainable_unchanged"] == []
        assert inv["frozen_in_optimizer"] == [] and inv["frozen_with_state"] == []
    assert res_b.frozen_check == "passed" and inv_a["trainable_changed"] == inv_b["trainable_changed"]
    below = [n for n in inv_b["trainable_changed"] if ".layers.0." in n or "embed" in n]
    assert below, "nothing below the band trained"
    a, b = dict(plain.model.named_parameters()), dict(ckpt.model.named_parameters())
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-5, msg=n)


def test_fsdp2_on_two_cpu_processes_keeps_the_band_frozen(tmp_path):
    """FSDP2 (fully_shard per block, gloo): the freeze check gathers the band through the engine;
    frozen tensors are bit-identical afterwards and absent from the optimizer; a changed shard is caught."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__)), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["sharded"] and r["frozen"] > 0 and r["check"] == "passed"
        assert r["frozen_changed"] == [] and r["frozen_in_optimizer"] == 0
        assert r["trainable_unchanged"] == [] and r["optimizer_tensors"] == r["trainable"]
        assert r["caught"] == [r["tampered"]]           # both ranks see rank 0's change after the gather
    assert ranks[0]["checksum"] == ranks[1]["checksum"]


def _fsdp_worker(out: str) -> None:
    """One rank of the FSDP2 test: SPPFT freezing from the package, sharding, two AdamW steps."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from conftest import tiny_model
    from safety_layers.core.layers import LayerRange
    from safety_layers.engine.distributed import full_parameters
    from safety_layers.finetune import FinetuneConfig, apply_method
    from safety_layers.finetune.callbacks import freeze_check_class

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    lm = tiny_model("llama", layers=4, seed=0)
    model, _, frozen = apply_method(lm, FinetuneConfig(model="tiny", method="sppft"), LayerRange(1, 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    check = freeze_check_class()(frozen, verbose=False)
    mesh = init_device_mesh("cpu", (2,))
    for block in lm.blocks.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args, state = SimpleNamespace(fsdp=True, deepspeed=None), SimpleNamespace(is_world_process_zero=rank == 0)
    check.on_train_begin(args, state, None, optimizer=opt)
    torch.manual_seed(rank)
    for _ in range(2):
        ids = torch.randint(3, 200, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    check.on_train_end(args, state, None, optimizer=opt, model=model)
    with full_parameters(model) as full:
        after = {n: v.clone() for n, v in full.items()}
    tampered = sorted(frozen)[0]
    if rank == 0:                               # change one frozen shard on one rank only
        with torch.no_grad():
            dict(model.named_parameters())[tampered].to_local().add_(1.0)
    record = {
        "sharded": all(hasattr(p, "full_tensor") for p in model.parameters()), "frozen": len(frozen),
        "check": check.result, "frozen_in_optimizer": sum(not p.requires_grad for g in opt.param_groups
                                                         for p in g["params"]),
        "optimizer_tensors": sum(len(g["params"]) for g in opt.param_groups),
        "trainable": sum(p.requires_grad for p in model.parameters()),
        "frozen_changed": [n for n in frozen if not torch.equal(after[n], before[n])],
        "trainable_unchanged": [n for n in after if n not in frozen and torch.equal(after[n], before[n])],
        "tampered": tampered, "caught": check.changed(model, sharded=True),
        "checksum": sum(float(v.double().sum()) for v in after.values())}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])


def test_the_example_launch_configs_shard_a_partly_frozen_model(monkeypatch):
    import yaml

    from safety_layers.finetune.devices import shards
    from safety_layers.finetune.plan import ways_out

    root = TESTS.parent / "examples"
    fsdp = yaml.safe_load((root / "accelerate-fsdp.yaml").read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_use_orig_params"] is True          # FSDP1 fallback with a frozen band
    ds = yaml.safe_load((root / "accelerate-deepspeed.yaml").read_text())
    zero = json.loads((TESTS.parent / ds["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["distributed_type"] == "DEEPSPEED" and zero["zero_optimization"]["stage"] == 3
    # the ways out name files that exist
    plan = SimpleNamespace(dtype="float32", method="full", training={
        "weights": 4, "gradients": 4, "optimizer": 8, "optimizer_8bit": 2, "activations": 1,
        "activations_checkpointed": 0})
    for name in ("accelerate-fsdp.yaml", "accelerate-deepspeed.yaml"):
        assert f"examples/{name}" in ways_out(plan) and (root / name).is_file()
    # under accelerate launch with these files the plan divides the states by the processes
    args = SimpleNamespace(fsdp="", world_size=8, hf_deepspeed_config=None)
    assert shards(args) == 1
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert shards(args) == 8
