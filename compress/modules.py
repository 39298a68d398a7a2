"""What every compressed module type says about itself, so the engine, the exporter, the loader,
distillation and evaluation need no branch per type.

A compressed module (a packed ``QuantLinear``, a W8A8 ``Int8Linear``, a ``LowRankLinear``, and
the types later families add) subclasses ``CompressedLinear`` and answers:

* ``dense_weight()``: the float32 (out, in) weight it computes with (the engine measures each
  layer's output error with it, and calibrates the later layers on it);
* ``merged()``: an equivalent plain ``nn.Linear`` (float32, from ``dense_weight()`` and the bias).
  Under ``export.lowrank: merged`` the exporter stores it in place of each module whose type sets
  ``merge_on_export`` (a container of factors); the other types keep their own stored form there
  (a quantized layer stays packed);
* ``factors()``: the sub-Linears a later pass compresses in turn (``{}``: none; low-rank: A, B);
* ``trainable(train)``: the ``TrainableView`` distillation puts in its place for the ``train``
  mode (None: nothing of its own trains; plain sub-Linears such as factors train as Linears);
* ``keep_dense(on)``: keep (or drop) a dequantized copy between forwards, for evaluation's many
  forwards; True where that applies to the module;
* ``quant_spec()``: its ``quantization_config`` group in the export (``None``: not a quantized
  layer as compressed-tensors sees it); ``group_format`` names that group's ``format``, and
  ``reads_group(scheme)`` says whether a stored group describes layers of this type;
* ``set_dtype(dtype)``: the compute dtype the loader builds the model in (a bias follows it; an
  embedding's lookups come out in it);
* ``tied_head()``: the output head that computes with this module's stored weight, where the
  model ties its lm_head to it (a quantized embedding); None for other types;
* ``runtimes(spec)`` (class method): the runtimes that read a layer of this type stored with
  ``spec`` (a ``read_quantization_config`` group);
* ``stored_layers(source)`` (class method): the layers a checkpoint stores in this type's format;
* ``stored_parameters(source, name)`` (class method): how many weights one stored layer stands for;
* ``from_checkpoint(source, name, linear, groups)`` (class method): the module for one stored
  layer, its buffers filled from the checkpoint (``linear`` is the plain module it replaces: an
  instance of the type's ``replaces``, ``nn.Linear`` unless it says otherwise).

The module-level helpers (``dense_weight``, ``factors``, ``quant_spec``, ``trainable``,
``keep_dense``, ``compressed_modules``, ``runtimes_for``, ...) take any module, a plain
``nn.Linear`` included, so their callers never ask for a type.

Types register themselves with ``register_module_type`` when their defining module is imported.
``module_types()`` loads the built-in families (``compress.registry``) and the entry points of
the ``compress.modules`` group on first use, and lists every type in registration order (the
loader asks each in turn). It imports torch, the standard library and the registry of families (by name) only.
"""

from __future__ import annotations

import math
from importlib.metadata import entry_points
from typing import ClassVar

import torch
from torch import nn

from compress.registry import load_families

# third parties add their types through this entry-point group; the built-in ones register when
# their family is loaded (``compress.registry``)
ENTRY_POINT_GROUP = "compress.modules"

COMPRESS = "compress"  # our own runtime (compress.load): it reads every registered type
VLLM, VLLM_CPU, TRANSFORMERS = "vLLM", "vLLM-CPU", "transformers"
ALL_RUNTIMES = (VLLM, VLLM_CPU, TRANSFORMERS, COMPRESS)
# export.target / --target values -> the runtime each names (tests/vllm and
# tests/checkpoint/test_transformers_load.py verify the rules the module types give)
TARGETS = {"vllm": VLLM, "vllm-cpu": VLLM_CPU, "transformers": TRANSFORMERS, "compress": COMPRESS}

_TYPES: list[type["CompressedLinear"]] = []
_loaded = False


class CompressedLinear(nn.Module):
    """Base of the compressed module types (see the module docstring)."""

    in_features: int
    out_features: int
    # True when the module also rounds its input at run time (W8A8): the engine then puts it in
    # place at once, so the later layers are calibrated on what it really feeds them
    quantizes_activations: ClassVar[bool] = False
    # True for a module that stores no format of its own, only submodules (low-rank factors)
    container: ClassVar[bool] = False
    # True when ``export.lowrank: merged`` stores ``merged()`` in the module's place
    merge_on_export: ClassVar[bool] = False
    # the ``format`` of its compressed-tensors quantization_config group (None: stored outside it)
    group_format: ClassVar[str | None] = None
    # the plain modules a stored layer of this type stands in for (the loader picks, for each
    # stored layer, the first type that stores it and replaces the skeleton's module there)
    replaces: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)
    backend: str | None = None  # the kernel backend compress.load chose (None: automatic)
    kernel: str | None = None  # the backend that ran last (None: a type without kernels)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged(self) -> nn.Linear:
        bias = getattr(self, "bias", None)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        lin.weight.data = self.dense_weight()
        if bias is not None:
            lin.bias.data = bias.detach().float().clone()
        return lin

    def factors(self) -> dict[str, nn.Module]:
        return {}

    def trainable(self, train: str) -> "TrainableView | None":
        return None

    def keep_dense(self, on: bool = True) -> bool:
        return False

    def quant_spec(self) -> dict | None:
        return None

    def set_dtype(self, dtype: torch.dtype) -> None:
        """The compute dtype of the loaded model: a bias follows it (stored tensors stay as stored)."""
        bias = getattr(self, "bias", None)
        if bias is not None:
            bias.data = bias.data.to(dtype)

    def tied_head(self) -> nn.Module | None:
        return None

    @classmethod
    def reads_group(cls, scheme: dict) -> bool:
        """Whether a ``read_quantization_config`` group describes layers of this type."""
        return cls.group_format is not None and cls.group_format == scheme.get("format")

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        """Why ``runtime`` cannot serve a layer of this type stored with ``spec``, and what works
        instead (None: it serves it). Default: our runtime only."""
        return None if runtime == COMPRESS else f"{runtime} has no reader for {cls.__name__} layers (compress.load reads them)"

    @classmethod
    def runtimes(cls, spec: dict) -> list[str]:
        """The runtimes that serve a layer stored with ``spec``."""
        return [r for r in ALL_RUNTIMES if cls.refusal(spec, r) is None]

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return []

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        """How many weights the stored layer ``name`` stands for (``compress inspect``'s bits per
        parameter). Default: the element count of its largest stored tensor (one per weight, as
        an int8 or sign matrix stores them); packed formats override it."""
        info = source.tensor_info([k for k in source.weight_map if k.rpartition(".")[0] == name])
        return max(math.prod(shape) for shape, _ in info.values())

    @classmethod
    def from_checkpoint(cls, source, name: str, linear: nn.Linear, groups: dict[str, dict]) -> "CompressedLinear":
        raise NotImplementedError


class TrainableView(nn.Module):
    """What distillation trains in place of a compressed module (``CompressedLinear.trainable``):
    it computes what the module computes through parameters that train, and ``commit()`` gives
    the compressed module back holding the trained values (same format, same layout)."""

    counts_as: ClassVar[str] = "quantized"  # the ``Prepared.counts`` entry it adds to

    def train_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters that train, by optimizer group (``scales``, ``weights``)."""
        raise NotImplementedError

    def commit(self) -> nn.Module:
        raise NotImplementedError


# ---------------------------------------------------------------- registry


def register_module_type(cls: type[CompressedLinear]) -> type[CompressedLinear]:
    if cls not in _TYPES:
        _TYPES.append(cls)
    return cls


def module_types() -> list[type[CompressedLinear]]:
    global _loaded
    if not _loaded:
        load_families()  # each family's passes import (and so register) its module types
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            register_module_type(ep.load())
        _loaded = True
    return list(_TYPES)


# ---------------------------------------------------------------- asking any module


def compressed_modules(model: nn.Module) -> list[tuple[str, CompressedLinear]]:
    """(name, module) of every compressed module in ``model`` (itself included), outer first."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CompressedLinear)]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight any Linear-like module computes with."""
    if isinstance(module, CompressedLinear):
        return module.dense_weight()
    return module.weight.detach().float()


def factors(module: nn.Module) -> dict[str, nn.Module]:
    """The sub-Linears of ``module`` a later pass compresses in turn ({} for a plain Linear)."""
    return module.factors() if isinstance(module, CompressedLinear) else {}


def tied_head(module: nn.Module | None) -> nn.Module | None:
    """The head a compressed input embedding serves a tied lm_head with (None: a plain embedding,
    which transformers' ``tie_weights`` shares)."""
    return module.tied_head() if isinstance(module, CompressedLinear) else None


def quant_spec(module: nn.Module) -> dict | None:
    """The module's ``quantization_config`` group (None: not stored as a quantized layer)."""
    return module.quant_spec() if isinstance(module, CompressedLinear) else None


def trainable(module: nn.Module, train: str) -> TrainableView | None:
    """The view distillation trains in place of ``module`` (None: it trains as it is, or not)."""
    return module.trainable(train) if isinstance(module, CompressedLinear) else None


def trainable_views(model: nn.Module) -> list[tuple[str, TrainableView]]:
    """(name, view) of every ``TrainableView`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TrainableView)]


def keep_dense(model: nn.Module, on: bool = True) -> int:
    """Let every compressed module of ``model`` that can keep its dequantized weight between
    forwards (packed layers on the CPU) do so (``on=False``: stop, and drop the copies):
    evaluation's many forwards then cost what the dense model's do, for the dense model's memory.
    Returns how many modules it applies to."""
    return sum(bool(m.keep_dense(on)) for _, m in compressed_modules(model))


def _getter(config):
    return config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)


def has_experts(config) -> bool:
    """Whether a model config (object or dict) routes its MLPs to experts (MoE): a runtime's
    rules for a scheme can depend on it (vLLM-CPU has no W4A16 MoE kernel)."""
    get = _getter(config)
    return any((get(k) or 0) > 0 for k in ("num_local_experts", "num_experts", "n_routed_experts"))


def runtime_context(config) -> dict:
    """What of the model a scheme's runtime rules read besides the scheme (``refusal``'s spec):
    ``tied`` (lm_head tied to the embedding: quantized embeddings) and ``moe`` (``has_experts``)."""
    return {"tied": bool(_getter(config)("tie_word_embeddings", False)), "moe": has_experts(config)}


def runtimes_for(scheme: dict) -> list[str]:
    """The runtimes that read a layer stored with ``scheme`` (a ``read_quantization_config``
    group: its ``format`` picks the module type)."""
    refused = scheme_refusals(scheme)
    return [r for r in ALL_RUNTIMES if r not in refused]


def scheme_refusals(scheme: dict) -> dict[str, str]:
    """{runtime: why} for each runtime that cannot serve a layer stored with ``scheme``."""
    for t in module_types():
        if t.reads_group(scheme):
            return {r: why for r in ALL_RUNTIMES if (why := t.refusal(scheme, r)) is not None}
    raise ValueError(f"no compressed module type stores quantization_config format {scheme.get('format')!r}")


def runtime_fields(scheme: dict) -> dict:
    """What ``compress inspect`` says of a scheme: ``vllm_servable`` and ``runtime`` (the
    runtimes, or 'compress only')."""
    names = runtimes_for(scheme)
    return {"vllm_servable": VLLM in names, "runtime": "compress only" if names == [COMPRESS] else ", ".join(names)}
