"""The serving form of packed layers on the CPU: ``QuantLinear``/``Int8Linear`` whose codes live
only in the CPU kernels' layout (``compress.kernels.cpu``), so a loaded model holds about its
packed size in memory, not a dense copy.

``compress.load`` converts each packed layer it can (``to_cpu_kernels``); the others keep the
torch reference and the load says which and why, once. The converted modules are the same types
to every reader (``isinstance(m, QuantLinear)``): ``dequantize()`` and the state_dict give the
export's tensors back exactly (``weight_packed`` / ``weight`` are recomputed from the kernel
layout on access; slow, for inspection and re-export, never on the forward path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.packing import pack_int32
from compress.kernels import cpu, native, record_kernel, reference
from compress.utils import replace_linear, trim_heap


def _copy_state(dst: nn.Module, src: nn.Module, skip: str) -> None:
    nn.Module.__init__(dst)
    for k, v in vars(src).items():
        if not k.startswith("_") and k not in ("training",):
            setattr(dst, k, v)
    for name, buf in src._buffers.items():
        if name != skip and buf is not None:
            dst.register_buffer(name, buf)
    dst.bias = src.bias
    dst.train(src.training)


class _DenseWhileEvaluating:
    """keep_dense for converted modules: the dequantized weight kept between forwards."""

    def keep_dense(self, on: bool = True) -> bool:
        self.__dict__["_keep_dense"] = on
        if not on:
            self.__dict__.pop("_dense", None)
        return True

    def _kept(self) -> torch.Tensor | None:
        if not self.__dict__.get("_keep_dense"):
            return None
        if "_dense" not in self.__dict__:
            self.__dict__["_dense"] = self.dequantize()
        return self.__dict__["_dense"]


class CpuQuantLinear(_DenseWhileEvaluating, QuantLinear):
    """A ``QuantLinear`` (4 or 8-bit) computing through the CPU int4/int8 kernels; its codes are
    held once, in ``self.cpu`` (``compress.kernels.cpu.CpuWeights``)."""

    kernel = "cpu"

    def __init__(self, src: QuantLinear, cw: cpu.CpuWeights):
        _copy_state(self, src, skip="weight_packed")
        self.cpu = cw
        self.kernel = "cpu"

    @property
    def weight_packed(self) -> torch.Tensor:
        """The export's int32 words, recomputed from the kernel layout (exact)."""
        return pack_int32(cpu.codes(self.cpu), self.bits, dim=1)

    def g_idx(self) -> torch.Tensor:
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        return torch.arange(self.in_features) // self.cpu.gs

    def dequantize(self) -> torch.Tensor:
        w = cpu.dequantize(self.cpu)
        if self.cpu.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.cpu.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = reference.quantize_input(x, self.act_bits)  # WnA8: the per-token int8 input (a no-op for weight-only)
        kept = self._kept()
        if kept is not None:  # evaluation's dequantize-once path (the torch reference)
            self.kernel = record_kernel("torch")
            return F.linear(x, kept.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        self.kernel = record_kernel("cpu")
        return cpu.wna16_linear(x, self.cpu, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_packed"] = self.weight_packed


class CpuInt8Linear(Int8Linear):
    """An ``Int8Linear`` (W8A8) computing through oneDNN's int8 GEMM; its weight is held once,
    prepacked, in ``self.cpu`` (``compress.kernels.cpu.CpuInt8``)."""

    kernel = "cpu"

    def __init__(self, src: Int8Linear):
        ci = cpu.build_int8(src.weight, src.weight_scale)
        _copy_state(self, src, skip="weight")
        self.cpu = ci
        self.kernel = "cpu"

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes, recomputed from oneDNN's prepacked layout (exact)."""
        return cpu.int8_codes(self.cpu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.kernel = record_kernel("cpu")
        return cpu.int8_linear(x, self.cpu, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight


def _needs_grad(*ts: torch.Tensor) -> bool:
    """The native kernels record no autograd graph: a forward that training differentiates
    (distillation through a loaded model) takes the differentiable path instead."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


class CpuGatedMLP(nn.Module):
    """A gated MLP (``down_proj(act_fn(gate_proj(x)) · up_proj(x))``, Llama's and its kin's) whose
    three projections are W8A8 on oneDNN, run as one fused call on bf16 inputs
    (``cpu.int8_gated_mlp``: x quantized once, SiLU · up and down's quantization in one pass). It
    holds the original module's children under their names, so the state_dict is unchanged; any
    other input (float32, or compress's CPU kernels off) takes the children one by one."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = src.gate_proj, src.up_proj, src.down_proj, src.act_fn
        self.source_type = type(src).__name__

    def _fused(self) -> bool:
        return (native.missing() is None and all(type(getattr(self, n)) is CpuInt8Linear for n in ("gate_proj", "up_proj", "down_proj"))
                and self.gate_proj.bias is None and self.up_proj.bias is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and not _needs_grad(x) and self._fused():
            for m in (self.gate_proj, self.up_proj, self.down_proj):
                m.kernel = record_kernel("cpu")
            return cpu.int8_gated_mlp(x, self.gate_proj.cpu, self.up_proj.cpu, self.down_proj.cpu, self.down_proj.bias)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _fusable_mlp(m: nn.Module) -> bool:
    """A module with W8A8 gate/up/down children and a SiLU whose own forward gives the fused
    result: checked on random input, so a family whose MLP computes anything else keeps its own."""
    names = ("gate_proj", "up_proj", "down_proj")
    if not all(hasattr(m, n) for n in names) or type(getattr(m, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return False
    fused = CpuGatedMLP(m)  # _fused: the three W8A8 on the CPU kernels, no bias on gate and up
    if not fused._fused() or m.gate_proj.in_features != m.up_proj.in_features:
        return False
    x = torch.randn(4, m.gate_proj.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        want, got = m(x).float(), fused(x).float()
    return bool(want.shape == got.shape and (got - want).norm() <= 0.02 * want.norm())


class CpuRMSNorm(nn.Module):
    """transformers' Llama RMSNorm (``weight · bf16(x · rsqrt(mean(x²) + eps))``) in one pass per
    row on bf16 (``native.rms_norm``; transformers makes five passes through float32 copies, about
    a fifth of a 2048-token prefill on 2 cores). Same ``weight`` parameter, same state_dict; other
    inputs, and any forward autograd must differentiate, take transformers' formula."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.weight = src.weight
        self.variance_epsilon = float(src.variance_epsilon)
        self.source_type = type(src).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" and not _needs_grad(x, self.weight)
                and native.missing() is None):
            return native.rms_norm(x, self.weight, self.variance_epsilon)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(x.dtype)


def _replaceable_norm(m: nn.Module) -> bool:
    """An RMSNorm computing Llama's formula: checked on random input (within one bf16 rounding in
    bf16, exactly in float32), so a family's variant (Gemma's 1 + w, another order) keeps its own."""
    w = getattr(m, "weight", None)
    if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, nn.Parameter) or w.dim() != 1 or w.dtype != torch.bfloat16:
        return False
    if not isinstance(getattr(m, "variance_epsilon", None), float) or list(m.children()) or w.device.type != "cpu":
        return False
    new = CpuRMSNorm(m)
    x = torch.randn(8, w.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        want, got = m(x.to(torch.bfloat16)).float(), new(x.to(torch.bfloat16)).float()
        exact = torch.equal(m(x), new(x))
    ulp = want.abs() * 2.0**-7  # one bf16 step (of the larger binade)
    return exact and want.shape == got.shape and bool(((got - want).abs() <= ulp).all())


def _replace_where(model: nn.Module, fits, make) -> int:
    """Replace every submodule ``m`` with ``fits(m)`` by ``make(m)``; returns how many."""
    n = 0
    for name, m in list(model.named_modules()):
        if fits(m):
            replace_linear(model, name, make(m))
            n += 1
    return n


def fuse_norms(model: nn.Module) -> int:
    """Replace every RMSNorm computing Llama's formula by a ``CpuRMSNorm``. Returns how many."""
    return 0 if native.missing() is not None else _replace_where(model, _replaceable_norm, CpuRMSNorm)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Replace every gated MLP whose projections are all W8A8 on the CPU kernels by a
    ``CpuGatedMLP`` (same children, same state_dict). Returns how many."""
    return _replace_where(model, _fusable_mlp, CpuGatedMLP)


def to_cpu_kernels(model: nn.Module, dtype: torch.dtype, log=print) -> dict:
    """Convert every packed layer of ``model`` (on the CPU) that the CPU kernels run, in place,
    one layer at a time (the export layout of each is freed as it goes). ``dtype``: the compute
    dtype (bf16; float32 and fp16 convert nothing: the torch reference is the exact float32 path).
    Returns {'converted': [...], 'reference': {name: reason}} and logs a one-line summary."""
    out: dict = {"converted": [], "reference": {}}
    why_all = cpu.available()
    for name, m in list(model.named_modules()):
        if type(m) is QuantLinear:
            why = why_all
            if why is None:
                try:
                    replace_linear(model, name, CpuQuantLinear(m, cpu.build(m, dtype)))
                except ValueError as e:
                    why = str(e)
        elif type(m) is Int8Linear:
            why = why_all or cpu.int8_unsupported()
            if why is None:
                replace_linear(model, name, CpuInt8Linear(m))
        else:
            continue
        if why is None:
            out["converted"].append(name)
        else:
            out["reference"][name] = why
    fused = fuse_gated_mlps(model) if out["converted"] else 0
    out["norms"] = norms = fuse_norms(model)
    trim_heap()  # the export layouts and the conversions' temporaries, handed back to the OS
    if out["converted"] or out["reference"]:
        msg = f"CPU integer kernels: {len(out['converted'])} packed layers"
        if out["reference"]:
            reasons = sorted(set(out["reference"].values()))
            msg += f"; {len(out['reference'])} on the torch reference ({'; '.join(reasons)})"
        on_torch = sum(isinstance(m, CpuQuantLinear) and m.cpu.bits == 4 and m.cpu.layout == "torch" for m in model.modules())
        if on_torch:  # slower at decode than ours: say why ours does not run
            msg += f"; {on_torch} 4-bit layers on torch's int4 kernel, not compress's ({native.missing()})"
        if fused:
            msg += f"; {fused} gated MLPs fused (W8A8: SiLU · up and down's quantization in one pass)"
        if norms:
            msg += f"; {norms} RMSNorms in one pass"
        log(msg)
    elif norms:
        log(f"CPU kernels: {norms} RMSNorms in one pass")
    out["fused_mlps"] = fused
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors hold in memory: parameters and buffers (shared ones once) and the
    CPU kernels' layouts."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, (CpuQuantLinear, CpuInt8Linear)):
            total += m.cpu.nbytes
    return total
