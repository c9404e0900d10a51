"""The GPU check of issue 19, sized for one device call (under 8 minutes on one GPU).

1. Every supported architecture as a tiny random model (4 layers, hidden 64, the bundled
   SmolLM2 tokenizer) through analyze, locate (a given alpha, a window of one: two or three
   candidates), finetune (sppft on layers 1-2, two steps) and evaluate, on the device and in
   the dtype the package's policy picks (``--device auto``: CUDA in bf16).
2. Randomly initialised models with the real shapes of Llama-3-8B-Instruct and gemma-2b-it
   (tests/data/model-configs, no weights), in bf16 on the GPU:
   - the bf16 matmul ceiling of this GPU (8192^3 matmuls), measured first;
   - extraction (last-token hidden states of every layer) tokens/s, and its FLOP rate
     (2 x parameters x tokens) as a share of that ceiling (goal >= 50 %);
   - batched greedy generation tokens/s against one prompt at a time (goal >= 10x) and the
     share of greedy tokens that agree (goal >= 99 %);
   - the peak GPU memory of one SPPFT step (AdamW, batch 4 x 256 tokens) against the plan's
     estimate (``safety-layers plan``; goal within 15 %).

``--device cpu --quick`` runs part 1 only, in fp32, so a test can smoke-run it. Completions
are never printed (random models, but the habit holds). Results go to ``--out`` as JSON.

Usage: python bench/gpu_check.py [--device auto|cpu|cuda] [--quick] [--archs llama,gemma]
                                 [--shapes llama3-8b,gemma-2b] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
CONFIGS = ROOT / "tests" / "data" / "model-configs"
SHAPES = {"llama3-8b": ("meta-llama--Meta-Llama-3-8B-Instruct", "6-12"), "gemma-2b": ("google--gemma-2b-it", "6-11")}
#: gemma3 is the multimodal wrapper; its text model is checked as gemma3_text
SKIP = {"gemma3"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=512, n_embd=64, n_layer=4, n_head=4, n_positions=512, n_inner=128,
            tie_word_embeddings=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tokenizer():
    """The bundled SmolLM2 tokenizer (built from the package's embedded files when missing)."""
    from transformers import AutoTokenizer

    from safety_layers.core.models import model_location

    tok = AutoTokenizer.from_pretrained(model_location("smollm2-135m-instruct")[1])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_folder(model_type: str, tok, root: Path) -> str:
    """A seeded tiny random model of ``model_type`` saved with the tokenizer (fp32 on disk)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TINY)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = root / model_type
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def pipeline(model_type: str, folder: str, device: str, work: Path) -> dict:
    """analyze, locate, finetune and evaluate on one tiny model; each step's seconds and facts."""
    from safety_layers.analysis import AnalyzeConfig, analyze
    from safety_layers.core.errors import SafetyLayersError
    from safety_layers.evaluate import EvaluateConfig, evaluate
    from safety_layers.finetune import FinetuneConfig, default_training_args, finetune
    from safety_layers.locate import LocateConfig, locate

    out, t = {"arch": model_type}, time.perf_counter()
    a = analyze(AnalyzeConfig(model=folder, limit=8, pairs=20, bootstrap=0, device=device, progress=False),
                run_dir=work / "analyze")
    env = json.loads((work / "analyze" / "env.json").read_text())
    out.update(analyze_s=round(time.perf_counter() - t, 1), model_device=env.get("model_device"),
               model_dtype=env.get("model_dtype"), initial_range=a.initial_range)
    t = time.perf_counter()
    try:
        loc = locate(LocateConfig(model=folder, limit=8, init="1-2", alpha=1.2, window=1, max_new_tokens=8,
                                  device=device, progress=False), run_dir=work / "locate")
        out["band"] = loc.safety_layers
    except SafetyLayersError as e:       # a random model refuses nothing: the candidates ran, none stands out
        if "refuses none" not in str(e):
            raise
        out["band"] = "none (a random model refuses nothing)"
    trials = work / "locate" / "trials.jsonl"
    out.update(locate_s=round(time.perf_counter() - t, 1),
               trials=len(trials.read_text().splitlines()) if trials.is_file() else 0)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Count to {i}.", "input": "", "output": " ".join(
        map(str, range(1, i + 2)))}) + "\n" for i in range(16)))
    cuda = device != "cpu"
    args = default_training_args(str(work / "ft"), max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                                 logging_strategy="no", disable_tqdm=True, report_to=[], use_cpu=not cuda,
                                 bf16=False, dataloader_pin_memory=False)
    t = time.perf_counter()
    ft = finetune(FinetuneConfig(model=folder, data=str(data), method="sppft", layers="1-2", max_length=64,
                                 device=device, out=str(work / "ft" / "model"), overwrite=True), args)
    out.update(finetune_s=round(time.perf_counter() - t, 1), steps=ft.global_step, frozen_check=ft.frozen_check)
    t = time.perf_counter()
    ev = evaluate(EvaluateConfig(model=str(work / "ft" / "model"), limit=8, judges="keyword", max_new_tokens=8,
                                 over_rejection=None, device=device, progress=False), run_dir=work / "evaluate")
    out.update(evaluate_s=round(time.perf_counter() - t, 1), harmful_n=ev.harmful.n if ev.harmful else None)
    return out


def tiny_part(device: str, archs: list[str]) -> list[dict]:
    from safety_layers.core.models import SUPPORTED_MODEL_TYPES

    tok, rows = tokenizer(), []
    with tempfile.TemporaryDirectory() as d:
        for model_type in archs or [t for t in SUPPORTED_MODEL_TYPES if t not in SKIP]:
            t = time.perf_counter()
            work = Path(d) / f"run-{model_type}"
            try:
                row = pipeline(model_type, tiny_folder(model_type, tok, Path(d)), device, work)
                row["ok"] = True
            except Exception as e:             # one architecture failing must not hide the others
                row = {"arch": model_type, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}",
                       "trace": traceback.format_exc()[-1500:]}
            row["seconds"] = round(time.perf_counter() - t, 1)
            log(f"tiny {model_type}: {'ok' if row['ok'] else 'FAILED ' + row['error']} ({row['seconds']} s)")
            rows.append(row)
    return rows


def matmul_ceiling(n: int = 8192, reps: int = 20) -> float:
    """bf16 FLOP/s of square matmuls on this GPU: the ceiling the model figures are read against."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def shape_model(name: str, tok):
    """The real shape of ``name`` randomly initialised in bf16 on the GPU, with the SmolLM2 tokenizer
    (ids stay below every vocabulary here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from safety_layers.core.models import LoadedModel, find_blocks

    cfg = AutoConfig.from_pretrained(CONFIGS / name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    return LoadedModel(model, tok, name, str(CONFIGS / name), find_blocks(model))


def prompts(tok, n: int, words: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    vocab = [w for w in tok.get_vocab() if w.isalpha() and len(w) > 3][:5000]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def extraction(lm, ceiling: float) -> dict:
    import torch

    from safety_layers.engine.activations import last_token_states

    ps = prompts(lm.tokenizer, 256, 200)
    tokens = sum(len(lm.tokenizer(p)["input_ids"]) for p in ps)
    last_token_states(lm, ps[:8], template="plain", cache=False, progress=False)      # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    states = last_token_states(lm, ps, template="plain", cache=False, progress=False, exact=False,
                               max_batch_tokens=65536)
    torch.cuda.synchronize()
    s = time.perf_counter() - t
    n_params = sum(p.numel() for p in lm.model.parameters())
    flops = 2 * n_params * tokens / s
    return {"prompts": len(ps), "tokens": tokens, "seconds": round(s, 2), "tokens_per_s": round(tokens / s),
            "states_dtype": str(states.dtype), "share_of_ceiling": round(flops / ceiling, 3)}


def generation(lm, n: int = 64, new: int = 64) -> dict:
    import torch

    from safety_layers.engine.generation import GenerationSettings, generate

    ps = prompts(lm.tokenizer, n, 30, seed=1)
    settings = dict(max_new_tokens=new, ignore_eos=True) if "ignore_eos" in GenerationSettings.__dataclass_fields__ \
        else dict(max_new_tokens=new)
    torch.cuda.synchronize()
    t = time.perf_counter()
    batched = generate(lm, ps, GenerationSettings(batch_size=n, **settings), template="plain", cache=False,
                       progress=False)
    torch.cuda.synchronize()
    tb = time.perf_counter() - t
    k = 8                                      # one at a time: a few prompts, the rate scales
    t = time.perf_counter()
    single = [generate(lm, [p], GenerationSettings(batch_size=1, **settings), template="plain", cache=False,
                       progress=False)[0] for p in ps[:k]]
    torch.cuda.synchronize()
    ts = time.perf_counter() - t
    tok_b = sum(c.num_tokens for c in batched)
    tok_s = sum(c.num_tokens for c in single)
    agree = total = 0
    for b, s in zip(batched[:k], single):
        for x, y in zip(b.token_ids, s.token_ids):
            total += 1
            agree += x == y
            if x != y:
                break                          # after a first difference the continuations differ anyway
        total += abs(len(b.token_ids) - len(s.token_ids))
    return {"batched_tokens_per_s": round(tok_b / tb, 1), "single_tokens_per_s": round(tok_s / ts, 1),
            "speedup": round((tok_b / tb) / (tok_s / ts), 1), "greedy_agreement": round(agree / max(total, 1), 4)}


def sppft_step(name: str, band: str, batch: int = 4, length: int = 256) -> dict:
    """Peak GPU memory of one SPPFT step (AdamW) of the real shape, against the plan's estimate."""
    import gc

    import torch

    from safety_layers.core.layers import LayerRange
    from safety_layers.finetune import FinetuneConfig, apply_method
    from safety_layers.finetune.plan import PlanConfig, plan_memory

    plan = plan_memory(PlanConfig(model=str(CONFIGS / name), method="sppft", band=band, dtype="bfloat16",
                                  batch_size=batch, max_length=length))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lm = shape_model(name, tokenizer())
    lm.model.config.use_cache = False
    model, _, _ = apply_method(lm, FinetuneConfig(model=name, method="sppft"), LayerRange.parse(band))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(3, 30000, (batch, length), device="cuda")
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    est = plan.training["total"]
    del model, opt, lm
    gc.collect()
    torch.cuda.empty_cache()
    return {"plan_gb": round(est / 1e9, 2), "measured_gb": round(peak / 1e9, 2), "ratio": round(peak / est, 3),
            "frozen_fraction": round(plan.frozen_fraction, 4)}


def shapes_part(names: list[str]) -> dict:
    import gc

    import torch

    out = {"gpu": torch.cuda.get_device_name(0)}
    ceiling = matmul_ceiling()
    out["bf16_matmul_tflops"] = round(ceiling / 1e12, 1)
    log(f"bf16 matmul ceiling {out['bf16_matmul_tflops']} TFLOP/s")
    tok = tokenizer()
    for key in names:
        name, band = SHAPES[key]
        row = {}
        try:
            lm = shape_model(name, tok)
            row["extraction"] = extraction(lm, ceiling)
            log(f"{key} extraction {row['extraction']}")
            row["generation"] = generation(lm)
            log(f"{key} generation {row['generation']}")
            del lm
            gc.collect()
            torch.cuda.empty_cache()
            row["sppft_step"] = sppft_step(name, band)
            log(f"{key} sppft step {row['sppft_step']}")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["trace"] = traceback.format_exc()[-1500:]
            log(f"{key} FAILED {row['error']}")
        out[key] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    ap.add_argument("--archs", default="", help="comma-separated model types (default: every supported one)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="gpu_check.json")
    a = ap.parse_args(argv)
    import torch

    from safety_layers.core.placement import resolve_placement
    from safety_layers.core.runs import environment

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    place = resolve_placement(a.device)
    t0 = time.perf_counter()
    result = {"environment": environment(), "placement": place.record()}
    log(f"device {place.device}, dtype {place.dtype_name}")
    result["tiny"] = tiny_part(a.device, [x for x in a.archs.split(",") if x])
    if not a.quick and place.on_gpu:
        result["shapes"] = shapes_part([x for x in a.shapes.split(",") if x])
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    ok = all(r["ok"] for r in result["tiny"])
    log(f"{sum(r['ok'] for r in result['tiny'])}/{len(result['tiny'])} architectures passed; "
        f"{result['seconds']} s; written {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
