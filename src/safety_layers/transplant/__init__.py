"""Layer transplant (paper §3.6, A.5.3): copy chosen parts of a donor's decoder layers into a base
model of the same architecture, save the result with a manifest, and evaluate it."""

from .run import PARTS, TransplantConfig, TransplantResult, copy_layers, part_parameters, transplant

__all__ = ["PARTS", "TransplantConfig", "TransplantResult", "copy_layers", "part_parameters", "transplant"]
