"""Where a model runs and in which dtype: one policy, decided when a model loads.

Every step that loads a model takes the same three settings (:func:`device_settings` adds
them to each step's config) and hands them to the loader, which resolves them here with
:func:`resolve_placement`:

``device``
    ``auto``: the CUDA GPU of this process (``cuda:LOCAL_RANK`` under a launcher) when one is
    visible, else the CPU; or ``cpu``, ``cuda``, ``cuda:N``.
``dtype``
    ``auto``: bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on a CPU;
    or ``float32``, ``bfloat16``, ``float16``. Paper mode sets float32 (the released code's
    precision) and keeps the GPU.
``device_map``
    None (the whole model on ``device``) or ``auto``: accelerate spreads a model too large
    for one GPU over every visible GPU (and the CPU after them).

On a CPU machine the defaults give what the package always did: fp32 on the CPU. What was
resolved goes into every run's ``env.json`` (:func:`describe`), and statistics are always
computed on fp32 copies of hidden states, whatever the weights' dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from .errors import SafetyLayersError

DTYPES = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICE_HELP = "where the model runs: auto (the GPU when there is one, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "weights dtype: auto (bfloat16 on a GPU that has it, float16 on older GPUs, float32 on a CPU)"
MAP_HELP = "auto: spread a model too large for one GPU over all GPUs (accelerate's device_map); unset: one device"


DTYPE_TYPE = Literal["auto", "float32", "bfloat16", "float16"] | None
MAP_TYPE = Literal["auto"] | None


def device_settings(cls=None, *, map_flag: bool = False):
    """Class decorator (put it under ``@dataclass``) that gives a step's config the policy's three
    fields, last in field order (after the step's own settings in --help and in YAML key lists),
    and :meth:`placement`. ``map_flag``: ``--device-map`` on the command line (inference steps;
    training spreads a model with FSDP or ZeRO-3 instead, so there it is YAML/Python only)."""

    def wrap(cls):
        extra = {
            "device": (str, field(default="auto", metadata={"help": DEVICE_HELP})),
            "dtype": (DTYPE_TYPE, field(default=None, metadata={"help": DTYPE_HELP, "default": "auto",
                                                                 "paper": "float32"})),
            "device_map": (MAP_TYPE, field(default=None, metadata={"help": MAP_HELP, "cli": map_flag})),
        }
        annotations = cls.__dict__.get("__annotations__", {})
        for name, (kind, spec) in extra.items():
            if name in annotations:
                raise TypeError(f"{cls.__name__} declares {name} itself: device_settings adds it")
            annotations[name] = kind
            setattr(cls, name, spec)
        cls.__annotations__ = annotations
        cls.placement = _placement
        cls.device_settings = True
        return cls

    return wrap(cls) if cls is not None else wrap


def _placement(self) -> "Placement":
    """The resolved device and dtype (a one-line error for a device or dtype this machine lacks)."""
    return resolve_placement(self.device, self.dtype or "auto", self.device_map)


def has_device_settings(obj) -> bool:
    """Whether ``obj`` (a config or its class) carries the policy's fields (:func:`device_settings`)."""
    return getattr(obj, "device_settings", False) is True


@dataclass(frozen=True)
class Placement:
    """A resolved policy: ``device`` (``cpu``, ``cuda:0``), ``dtype`` (a torch dtype) and the device map."""

    device: str
    dtype: object
    device_map: str | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def record(self) -> dict:
        return {"device": self.device, "dtype": self.dtype_name, "device_map": self.device_map}


def dtype_name(dtype) -> str:
    """``"bf16"``, ``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"`` (one-line error otherwise)."""
    text = str(dtype).removeprefix("torch.") if dtype is not None else "auto"
    text = _ALIASES.get(text, text)
    if text not in DTYPES:
        raise SafetyLayersError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return text


def _local_rank() -> int:
    """This process's GPU index under torchrun / accelerate launch (``LOCAL_RANK``), else 0."""
    try:
        return int(os.environ.get("LOCAL_RANK") or 0)
    except ValueError:
        return 0


def resolve_device(device: str | None = "auto") -> str:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a concrete device string, checked against this machine."""
    import torch

    text = str(device or "auto").strip().lower()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "auto":
        return f"cuda:{_local_rank() % gpus}" if gpus else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "cuda" or text.startswith("cuda:"):
        if not gpus:
            raise SafetyLayersError(f"--device {text}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                                    "False): use --device cpu or auto, or install a CUDA build of torch")
        index = _local_rank() % gpus if text == "cuda" else text.partition(":")[2]
        if not str(index).isdigit() or int(index) >= gpus:
            raise SafetyLayersError(f"--device {text}: this machine has {gpus} GPU(s), cuda:0-cuda:{gpus - 1}")
        return f"cuda:{int(index)}"
    raise SafetyLayersError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_dtype(dtype, device: str):
    """``auto`` -> bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on a CPU;
    float16 on a CPU is refused."""
    import torch

    name = dtype_name(dtype)
    gpu = device.startswith("cuda")
    if name == "auto":
        if not gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "float16" and not gpu:
        raise SafetyLayersError("--dtype float16 on a CPU: half-precision matmuls are slow or missing there and "
                                "lose accuracy; use --dtype float32 (or bfloat16), or run on a GPU")
    return getattr(torch, name)


def resolve_placement(device: str | None = "auto", dtype="auto", device_map: str | None = None) -> Placement:
    """The one place the device/dtype policy is decided (see the module docstring)."""
    if device_map not in (None, "auto", "none"):
        raise SafetyLayersError(f"unknown device_map {device_map!r}: use auto (spread over all GPUs) or leave it unset")
    where = resolve_device(device)
    if device_map == "auto":
        if not where.startswith("cuda"):
            raise SafetyLayersError("--device-map auto spreads a model over GPUs, and none is in use here: "
                                    "drop --device-map, or run on a machine with GPUs")
        if str(device or "auto").lower() not in ("auto", "cuda"):
            raise SafetyLayersError(f"--device-map auto places the model itself: drop --device {device}")
    return Placement(where, resolve_dtype(dtype, where), "auto" if device_map == "auto" else None)


def as_placement(value=None) -> Placement:
    """A Placement from a Placement, a config with :func:`device_settings`, or None (the defaults)."""
    if isinstance(value, Placement):
        return value
    if has_device_settings(value):
        return value.placement()
    if value is None:
        return resolve_placement()
    raise SafetyLayersError(f"expected device settings, got {type(value).__name__}")


def describe(model) -> dict:
    """Where a loaded model's weights actually are: device(s), dtype(s), device map (for env.json)."""
    devices, dtypes = {}, {}
    for p in model.parameters():
        devices[str(p.device)] = devices.get(str(p.device), 0) + p.numel()
        dtypes[str(p.dtype).removeprefix("torch.")] = dtypes.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
    main = lambda d: max(d, key=d.get) if d else None  # noqa: E731
    out = {"model_device": main(devices), "model_dtype": main(dtypes)}
    if len(devices) > 1:
        out["model_devices"] = sorted(devices)
    if getattr(model, "hf_device_map", None):
        out["device_map"] = "auto"
    return out
