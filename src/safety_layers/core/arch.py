"""The architecture map: where each supported model family keeps its decoder blocks.

One :class:`ArchSpec` per architecture says where the decoder blocks live and which module
inside a block is ``attn.q``, ``mlp.down`` and so on. Everything else in the package
(hidden-state capture, scaling, freezing) goes through this table, so a new architecture is
one entry here, never an edit in the analysis code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import SafetyLayersError

# --------------------------------------------------------------------------- architectures

_LLAMA_ATTN = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
               "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj"}
_LLAMA_MLP = {"mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its decoder blocks and their parts.

    ``layers``: candidate paths of the block ``ModuleList`` (first that exists wins; a
    multimodal wrapper nests the language model one level deeper).
    ``components``: canonical name -> module path inside a block. Fused projections
    (phi3's ``qkv_proj``, gpt2's ``c_attn``) get one canonical name (``attn.qkv``): scaling
    a fused matrix by a scalar is the same as scaling its parts alike.
    ``norms``: the block's normalisation modules (frozen only on request).
    ``final_norm``: candidate paths of the norm applied after the last block.
    ``qk_norms``: canonical name -> path of the norm applied to that projection's output
    (qwen3, gemma3, olmo2): it renormalises q and k, so its gain belongs to "the
    parameters of a layer" next to the projection (see :meth:`Blocks.parameter_paths`).
    """

    model_types: tuple[str, ...]
    layers: tuple[str, ...]
    components: dict[str, str]
    norms: tuple[str, ...]
    final_norm: tuple[str, ...]
    qk_norms: dict[str, str] = field(default_factory=dict)


ARCHS: list[ArchSpec] = [
    ArchSpec(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo2"),
             ("model.layers", "model.language_model.layers"),
             {**_LLAMA_ATTN, **_LLAMA_MLP},
             _LLAMA_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
             ("model.norm", "model.language_model.norm"),
             {"attn.q": "self_attn.q_norm", "attn.k": "self_attn.k_norm"}),
    ArchSpec(("phi3",), ("model.layers",),
             {"attn.qkv": "self_attn.qkv_proj", "attn.o": "self_attn.o_proj",
              "mlp.gate_up": "mlp.gate_up_proj", "mlp.down": "mlp.down_proj"},
             _LLAMA_NORMS, ("model.norm",)),
    ArchSpec(("gpt2",), ("transformer.h",),
             {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj",
              "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"},
             ("ln_1", "ln_2"), ("transformer.ln_f",)),
    ArchSpec(("gpt_neox",), ("gpt_neox.layers",),
             {"attn.qkv": "attention.query_key_value", "attn.o": "attention.dense",
              "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"},
             _LLAMA_NORMS, ("gpt_neox.final_layer_norm",)),
]

SUPPORTED_MODEL_TYPES = sorted({t for a in ARCHS for t in a.model_types})

#: The paper's choice of what "the parameters of a layer" are: every attention and MLP
#: weight matrix (q, k, v, o, gate, up, down), no norms, biases or embeddings.
PAPER_COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
                    "mlp.gate", "mlp.up", "mlp.gate_up", "mlp.down")
#: Model types whose RMSNorm multiplies by ``1 + weight`` instead of ``weight``.
UNIT_OFFSET_NORMS = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})
#: The OpenReview submission's scaling code never wrote o_proj back (docs/paper.md §3.1).
NO_O_PROJ_COMPONENTS = tuple(c for c in PAPER_COMPONENTS if c != "attn.o")


def _get(root: torch.nn.Module, path: str):
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            return None
        mod = getattr(mod, part)
    return mod


@dataclass
class Blocks:
    """The decoder blocks of one model, resolved through its :class:`ArchSpec`."""

    model: torch.nn.Module
    spec: ArchSpec
    layers_path: str

    @property
    def layers(self) -> torch.nn.ModuleList:
        return _get(self.model, self.layers_path)

    def __len__(self) -> int:
        return len(self.layers)

    def component(self, layer: int, name: str) -> torch.nn.Module:
        return _get(self.layers[layer], self.spec.components[name])

    def components(self, layer: int, names=PAPER_COMPONENTS) -> dict[str, torch.nn.Module]:
        """Canonical name -> module for the names this architecture has (others skipped)."""
        return {n: self.component(layer, n) for n in names if n in self.spec.components}

    def weights(self, layer: int, names=PAPER_COMPONENTS, norms: bool = False) -> dict[str, torch.nn.Parameter]:
        """Canonical name -> weight matrix (and norm weights if asked) of one block."""
        out = {f"{n}.weight": m.weight for n, m in self.components(layer, names).items()}
        if norms:
            for n in self.spec.norms:
                mod = _get(self.layers[layer], n)
                if mod is not None and getattr(mod, "weight", None) is not None:
                    out[f"norm.{n}.weight"] = mod.weight
        return out

    def parameter_paths(self, layer: int, names=PAPER_COMPONENTS) -> dict[str, str]:
        """Canonical name -> module path (inside the block) of the modules that hold "the
        parameters of a layer": each chosen projection, and for ``attn.q``/``attn.k`` the q/k
        norm after it where the architecture has one (``attn.q.norm``). Scaling and freezing
        both read this one definition.
        """
        block = self.layers[layer]
        out = {n: self.spec.components[n] for n in names if n in self.spec.components}
        for n, path in self.spec.qk_norms.items():
            if n in names and _get(block, path) is not None:
                out[f"{n}.norm"] = path
        return out

    def layer_parameters(self, layer: int, names=PAPER_COMPONENTS) -> dict[str, torch.nn.Parameter]:
        """Canonical name -> weight, bias and q/k-norm gain of one block: what scaling multiplies."""
        out: dict[str, torch.nn.Parameter] = {}
        for n, path in self.parameter_paths(layer, names).items():
            mod = _get(self.layers[layer], path)
            for attr in ("weight", "bias"):
                if getattr(mod, attr, None) is not None:
                    out[f"{n}.{attr}"] = getattr(mod, attr)
        return out

    @property
    def norm_offset(self) -> float:
        """1.0 where a norm's gain is ``1 + weight`` (the gemma family), else 0.0."""
        return 1.0 if getattr(getattr(self.model, "config", None), "model_type", None) in UNIT_OFFSET_NORMS else 0.0

    def parameters(self, layers, norms: bool = False) -> dict[str, torch.nn.Parameter]:
        """Every parameter that freezing ``layers`` (a LayerRange or layer indices) covers, by its
        name in :attr:`model`: every parameter of the modules of :meth:`parameter_paths` (weights,
        biases, q/k norms, LoRA adapters inside them), which is the whole attention and MLP of
        each block on every ArchSpec, and with ``norms`` the block's own norms too.

        The one meaning of "frozen" in this package: SPPFT freezes the band without norms (as
        the paper's released code does), align's ``frozen_layers`` with them.
        """
        out: dict[str, torch.nn.Parameter] = {}
        for i in getattr(layers, "indices", layers):
            block = self.layers[i]
            paths = list(self.parameter_paths(i, tuple(self.spec.components)).values())
            paths += [n for n in self.spec.norms if norms and hasattr(block, n)]
            for path in paths:
                for name, p in block.get_submodule(path).named_parameters(prefix=self.param_name(i, path)):
                    out[name] = p
        return out

    def param_name(self, layer: int, module_path: str) -> str:
        return f"{self.layers_path}.{layer}.{module_path}"

    @property
    def final_norm(self) -> torch.nn.Module | None:
        for path in self.spec.final_norm:
            mod = _get(self.model, path)
            if mod is not None:
                return mod
        return None


def find_blocks(model: torch.nn.Module) -> Blocks:
    """Resolve the decoder blocks of ``model`` or raise naming what was looked for."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    specs = [a for a in ARCHS if model_type in a.model_types] or ARCHS
    tried = []
    for spec in specs:
        for path in spec.layers:
            layers = _get(model, path)
            tried.append(path)
            if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
                continue
            missing = [p for p in spec.components.values() if _get(layers[0], p) is None]
            if missing:
                tried[-1] += f" (block lacks {', '.join(missing)})"
                continue
            return Blocks(model, spec, path)
    raise SafetyLayersError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}): no decoder blocks found at "
        f"{'; '.join(dict.fromkeys(tried))}. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}; "
        "add an ArchSpec to safety_layers.core.models.ARCHS for others"
    )
