"""Make transformers' module tree look like the checkpoint on disk: a Linear wherever the file
stores a Linear's weight, under the name the file uses.

The engine calibrates and replaces ``nn.Linear`` modules, and reads each parameter by its module
path. Three kinds of model break one of those two assumptions, and ``adapt`` (run on every
skeleton ``ModelSource`` builds) fixes each where the model is built, so nothing downstream
(engine, passes, exporter, loader) needs a branch for them:

* **GPT-2-style ``Conv1D``** (gpt2 and any model using ``transformers.pytorch_utils.Conv1D``): a
  Linear whose weight is stored transposed, (in, out). It becomes a ``Conv1DLinear``: an
  ``nn.Linear`` in memory, whose state dict (what the exporter writes) and ``materialize`` (what
  reads the checkpoint) transpose at the file boundary, so a dense export keeps the layout
  transformers expects. Quantized layers are written in compressed-tensors' (out, in) packed
  layout, as for any Linear.
* **Fused mixture-of-experts weights** (transformers 5 keeps mixtral's, qwen2/3-moe's, ... experts
  as two 3-D parameters ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I); checkpoints on
  disk store one Linear per expert and projection). The experts module becomes an
  ``UnfusedExperts``: E experts of three Linears each, named as transformers' conversion mapping
  says the checkpoint names them (``w1/w3/w2`` for mixtral, ``gate_proj/up_proj/down_proj`` for
  the qwen2-moe family), computing the same routed sum. While the engine collects statistics
  (``calibrating``) every expert sees every calibration token, so an expert the router rarely
  picks is calibrated on as much data as the others; the block's output is still the routed one.
* **Renamed submodules** (mixtral's ``block_sparse_moe`` on disk is ``mlp`` in memory): the child
  is registered under the checkpoint's name and stays reachable under transformers' name for the
  model's own forward.

Routers (a Linear in an MoE block that produces one logit per expert, or the single shared-expert
gate) are marked ``_compress_router``: passes leave them in full precision unless a target names
them (``Pass.matches``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn
from transformers import conversion_mapping as cm
from transformers.pytorch_utils import Conv1D

from compress.errors import UsageError


class Conv1DLinear(nn.Linear):
    """transformers' ``Conv1D`` as the Linear it is; its checkpoint weight is (in, out)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def from_disk(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Parameter ``name`` of ``module`` as the model computes with it, given the checkpoint's
    tensor (a Conv1D weight is transposed)."""
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    if isinstance(mod, Conv1DLinear) and leaf == "weight":
        return tensor.t().contiguous()
    return tensor


class _Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its Linears under the checkpoint's names."""

    def __init__(self, names: tuple[str, str, str], hidden: int, inter: int, act_fn: nn.Module, device, dtype):
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, up, nn.Linear(hidden, inter, bias=False, device=device, dtype=dtype))
        setattr(self, down, nn.Linear(inter, hidden, bias=False, device=device, dtype=dtype))
        self.__dict__["act_fn"] = act_fn  # shared with the other experts, not a child of each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """A fused experts module (3-D ``gate_up_proj`` / ``down_proj``) as one Linear per expert and
    projection; same call (hidden (N, H), top_k_index (N, k), top_k_weights (N, k)), same sum."""

    calibrate_all = False  # set by ``calibrating``: every expert runs on every token

    def __init__(self, fused: nn.Module, names: tuple[str, str, str]):
        E, two_i, H = fused.gate_up_proj.shape
        p = fused.gate_up_proj
        super().__init__([_Expert(names, H, two_i // 2, fused.act_fn, p.device, p.dtype) for _ in range(E)])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if self.calibrate_all:
                # statistics for every expert on every token; only the routed rows are summed
                y = expert(hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


@contextmanager
def calibrating(block: nn.Module):
    """Within: the block's experts see every token (see ``UnfusedExperts``)."""
    experts = [m for m in block.modules() if isinstance(m, UnfusedExperts)]
    for m in experts:
        m.calibrate_all = True
    try:
        yield
    finally:
        for m in experts:
            m.calibrate_all = False


def _conversions(model: nn.Module, model_type: str) -> tuple[list[tuple[str, str, bool]], tuple[str, str, str] | None]:
    """From transformers' checkpoint conversion mapping for ``model``: the renamings of one child
    module (checkpoint name, in-memory name, only at the root), and the per-expert Linear names
    (gate, up, down) of fused experts. Mappings that are not one of these shapes are ignored."""
    try:

        if hasattr(cm, "extract_weight_conversions_for_model"):
            rules = cm.extract_weight_conversions_for_model(model) or []
        else:
            rules = cm.get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # an older transformers: no mapping, checkpoints are read as named
        rules = []
    renames, gate_up, down = [], None, None
    one_child = re.compile(r"(\^)?(?:\\?\.)?(\w+)\\?\.")  # ".block_sparse_moe.", "^embed_out\.", "lm_head."
    for r in rules:
        src, dst = list(r.source_patterns), list(r.target_patterns)
        if type(r).__name__ == "WeightRenaming":
            if len(src) == len(dst) == 1:
                a, b = one_child.fullmatch(src[0]), one_child.fullmatch(dst[0])
                if a and b:
                    renames.append((a.group(2), b.group(2), bool(a.group(1))))
            continue
        leaf = [re.search(r"experts\.\*\.(\w+)\.weight$", p) for p in src]
        if not all(leaf) or len(dst) != 1:
            continue
        if dst[0].endswith("experts.gate_up_proj") and len(leaf) == 2:
            gate_up = (leaf[0].group(1), leaf[1].group(1))
        elif dst[0].endswith("experts.down_proj") and len(leaf) == 1:
            down = leaf[0].group(1)
    names = (*gate_up, down) if gate_up and down else None
    return renames, names


def _is_fused_experts(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3


def adapt(model: nn.Module, model_type: str) -> nn.Module:
    """Rewrite ``model`` in place as the module docstring says; returns it."""

    renames, expert_names = _conversions(model, model_type)
    conv1d: list[str] = []
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, Conv1D):
                lin = Conv1DLinear(child.nx, child.nf, bias=child.bias is not None, device=child.weight.device, dtype=child.weight.dtype)
                if not child.weight.is_meta:
                    lin.load_state_dict(child.state_dict())
                setattr(mod, cname, lin)
                conv1d.append(full)
            elif _is_fused_experts(child):
                E, two_i, H = child.gate_up_proj.shape
                if getattr(child, "has_bias", False) or getattr(child, "is_transposed", False) or child.down_proj.shape != (E, H, two_i // 2):
                    raise UsageError(
                        f"{full} ({type(child).__name__}, model_type {model_type!r}): fused experts in a layout compress "
                        "cannot unfuse (biases or transposed weights); supported: gate_up_proj (E, 2I, H) and down_proj (E, H, I) "
                        "as in mixtral and qwen2/3-moe"
                    )
                unfused = UnfusedExperts(child, expert_names or ("gate_proj", "up_proj", "down_proj"))
                if not child.gate_up_proj.is_meta:
                    I = two_i // 2
                    for e, ex in enumerate(unfused):
                        g, u, d = (getattr(ex, n) for n in ex.names)
                        g.weight.data.copy_(child.gate_up_proj.data[e, :I])
                        u.weight.data.copy_(child.gate_up_proj.data[e, I:])
                        d.weight.data.copy_(child.down_proj.data[e])
                setattr(mod, cname, unfused)
                for sib in mod.children():  # routers: one logit per expert, or the shared-expert gate
                    if isinstance(sib, nn.Linear) and sib.out_features in (E, 1):
                        sib._compress_router = True
    aliases: list[tuple[str, str]] = []
    for disk, mem, root in renames:
        for path, mod in [("", model)] if root else list(model.named_modules()):
            child = mod._modules.get(mem)
            if child is not None and disk not in mod._modules:
                mod._modules[disk] = mod._modules.pop(mem)
                mod.__dict__[mem] = child  # transformers' forward still reads self.<mem>
                aliases.append((f"{path}.{disk}" if path else disk, f"{path}.{mem}" if path else mem))
    model.__dict__["_compress_aliases"] = aliases
    model.__dict__["_compress_conv1d"] = conv1d
    return model


def transformers_names(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` (checkpoint module paths) plus, for those under a renamed module, the path
    transformers knows them by (compressed-tensors matches a config's ``ignore`` and targets
    against transformers' module tree; vLLM against the checkpoint's names)."""
    out = list(names)
    for disk, mem in model.__dict__.get("_compress_aliases", []):
        out += [mem + n[len(disk) :] for n in names if n == disk or n.startswith(disk + ".")]
    return sorted(set(out))
