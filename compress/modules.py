"""What every compressed module type says about itself, so the engine, the exporter and the
loader need no branch per type.

A compressed module (a packed ``QuantLinear``, a W8A8 ``Int8Linear``, and the types later
families add) subclasses ``CompressedLinear`` and answers four questions:

* ``dense_weight()``: the float32 (out, in) weight it computes with (the engine measures each
  layer's output error with it, and calibrates the later layers on it);
* ``quant_spec()``: its ``quantization_config`` group in the export (``None``: not a quantized
  layer as compressed-tensors sees it);
* ``stored_layers(source)`` (class method): the layers a checkpoint stores in this type's format;
* ``from_checkpoint(source, name, linear, groups)`` (class method): the module for one stored
  layer, its buffers filled from the checkpoint (``linear`` is the plain Linear it replaces).

Types register with ``register_module_type``; ``module_types()`` lists them in registration
order (the loader asks each in turn). A leaf module: it imports torch only.
"""

from __future__ import annotations

import torch
from torch import nn

_TYPES: list[type["CompressedLinear"]] = []


class CompressedLinear(nn.Module):
    """Base of the compressed module types (see the module docstring)."""

    in_features: int
    out_features: int
    # True when the module also rounds its input at run time (W8A8): the engine then puts it in
    # place at once, so the later layers are calibrated on what it really feeds them
    quantizes_activations = False
    # True for a module that stores no format of its own, only submodules (low-rank factors)
    container = False

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def quant_spec(self) -> dict | None:
        return None

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return []

    @classmethod
    def from_checkpoint(cls, source, name: str, linear: nn.Linear, groups: dict[str, dict]) -> "CompressedLinear":
        raise NotImplementedError


def register_module_type(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    if cls not in _TYPES:
        _TYPES.append(cls)
    return cls


def module_types() -> list[type[CompressedLinear]]:
    import compress.checkpoint.formats  # noqa: F401  (registers the built-in types)
    import compress.lowrank.module  # noqa: F401

    return list(_TYPES)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight any Linear-like module computes with."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    return module.weight.detach().float()
