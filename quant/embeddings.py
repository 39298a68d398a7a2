"""The ``embeddings`` option of the quantization passes (rtn, gptq, awq): the token embedding and
the lm_head quantized too.

The table W (vocab, d) is quantized row by row, symmetric, in groups of consecutive columns along
the hidden dimension, and stored pack-quantized like the Linears
(``compress.checkpoint.embedding.QuantEmbedding``), served by dequantizing only the rows looked up.
The lm_head is the same kind of matrix read as a Linear: a tied one computes with the table itself
(one stored tensor), an untied one is stored as a packed Linear with the same scheme.

Two ways to round (``method``), in the engine's two apply_outside phases:

* ``rtn`` (the rtn and awq passes): round-to-nearest with the pass's observer, before block 0, so
  the sweep calibrates the blocks on the quantized embedding's output;
* ``gptq`` (the gptq pass, its default): what computes the logits is solved by GPTQ on the head's
  input, the final norm of the compressed model's last hidden states (H = XᵀX, after the last
  block): a tied table that way (its lookups then carry the solver's error too, measured as
  ``rel_weight_error``); an untied head that way, its embedding by RTN before block 0 (a lookup has
  no input a second-order solver could weigh).
"""

from __future__ import annotations

from typing import Literal

import torch
from compress.quant.rtn import QuantScheme, rtn_quantize
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from compress.checkpoint.embedding import QuantEmbedding
from compress.checkpoint.formats import QuantLinear
from compress.errors import UsageError
from compress.modules import TARGETS


def group_option(v):
    """A ``group_size`` option: auto, -1 (one scale per row), or a positive integer (a number or text)."""
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if v != "auto" and (not isinstance(v, int) or v != -1 and v < 1):
        raise ValueError("must be auto, -1 (per row) or a positive divisor of the hidden size")
    return v


class EmbeddingsConfig(BaseModel):
    """The ``embeddings`` option of rtn, gptq and awq (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = 4  # the widths vLLM's quantized-embedding lookup serves
    # how the head (a tied table: the table) is rounded: gptq on its calibration inputs after the
    # last block, or rtn; auto: gptq where the pass is gptq, else rtn
    method: Literal["auto", "rtn", "gptq"] = "auto"
    # hidden-dimension columns per scale; auto: the pass's own group_size (its auto: 128 where it
    # divides the table's width, else the largest power of two >= 16 that does, else -1); -1: per row
    group_size: int | Literal["auto"] = "auto"

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v):
        return group_option(v)


def embedding_group(config, width: int) -> int:
    """The group size of a ``width``-column table under a pass's ``config`` (its ``embeddings``;
    auto: the pass's own group size, its auto rule applied to the table's width)."""
    g = config.embeddings.group_size
    return config.group_for(width) if g == "auto" else g


def _scheme(config, dtype: torch.dtype, width: int) -> QuantScheme:
    return QuantScheme(bits=config.embeddings.bits, group_size=embedding_group(config, width), symmetric=True,
                       observer=config.observer, scale_dtype=dtype)


def _info(W: torch.Tensor, Wq: torch.Tensor, res, **extra) -> dict:
    err = float((Wq - W).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
    return {"bits": res.scheme.bits, "group_size": res.scheme.group_size, "rel_weight_error": err, **extra}


def _rtn(stage, config, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, object]:
    W = stage.weight(name)  # (vocab, d)
    return W, rtn_quantize(W, _scheme(config, dtype, W.shape[1]))


def _solved(stage, config, dtype: torch.dtype, solve) -> tuple[torch.Tensor, object, float]:
    """The head's matrix (the table itself where tied) solved by ``solve(W, H, scheme)`` on the
    head's input statistics; with its relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    H = stage.head_hessian()  # (d, d)
    W = stage.weight(stage.embedding if stage.tied else stage.head)  # (vocab, d)
    res = solve(W, H, _scheme(config, dtype, W.shape[1]))
    D = res.dequantize() - W
    return W, res, float(torch.sum((D @ H) * D) / torch.sum((W @ H) * W).clamp_min(1e-30))


def quantize_outside(stage, config, dtype: torch.dtype, solve=None) -> dict[str, tuple[nn.Module, dict]]:
    """The apply_outside stage of a pass with ``embeddings`` (``stage``:
    ``compress.engine.outside.OutsideStage``, in its phase): {name: (module, report info)}, scales
    in ``dtype`` (the checkpoint's). ``solve(W, H, scheme) -> QuantResult``: the pass's GPTQ (None:
    rtn only)."""
    gptq = solve is not None and config.embeddings.method != "rtn" and stage.head is not None
    emb, head, out = stage.embedding, stage.head, {}
    if stage.phase == "before":
        if not (gptq and stage.tied):
            W, res = _rtn(stage, config, dtype, emb)
            m = QuantEmbedding.from_result(res, padding_idx=stage.module(emb).padding_idx)
            out[emb] = (m, _info(W, m.dequantize(), res, tied_head=stage.tied, method="rtn"))
        if head is not None and not stage.tied and not gptq:
            W, res = _rtn(stage, config, dtype, head)
            m = QuantLinear.from_result(res, bias=stage.bias(head), bias_dtype=dtype)
            out[head] = (m, _info(W, m.dequantize(), res, method="rtn"))
    elif gptq:
        W, res, err = _solved(stage, config, dtype, solve)
        if stage.tied:
            m = QuantEmbedding.from_result(res, padding_idx=stage.module(emb).padding_idx)
        else:
            m = QuantLinear.from_result(res, bias=stage.bias(head), bias_dtype=dtype)
        out[emb if stage.tied else head] = (m, _info(W, m.dense_weight(), res, tied_head=stage.tied, method="gptq",
                                                     rel_output_error=err))
    return out


def _plain_lookup(model: nn.Module, at: str) -> tuple[str, nn.Module]:
    emb = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is emb)
    if type(emb).forward is not nn.Embedding.forward:
        raise UsageError(f"{at}: {name} is a {type(emb).__name__}, whose forward does more than look rows up (a scale, a "
                         "projection); quantized embeddings replace plain nn.Embedding lookups only: drop `embeddings`")
    return name, emb


def _check_target(at: str, config, job, tied: bool, width: int) -> None:
    target = getattr(job.export, "target", None)
    if target is None:
        return
    spec = {"bits": config.embeddings.bits, "group_size": embedding_group(config, width), "symmetric": True, "act_order": False}
    why = QuantEmbedding.refusal({**spec, "tied": tied}, TARGETS[target])
    if why is None and not tied:  # the untied head is a packed Linear
        why = QuantLinear.refusal(spec, TARGETS[target])
    if why:
        raise UsageError(f"{at}: export.target is {target}, and {why}")


def check_embeddings(where: str, p, job) -> None:
    """Before any work: ``embeddings`` on one pass only, a compressed-tensors export, a plain
    lookup table, a group size that divides its width (and the untied head's), a target runtime
    that reads it. ``where``: ``passes.K.NAME``; ``p``: the pass; ``job``: ``compress.passes.JobView``."""
    if p.config.embeddings is None:
        return
    at = f"{where}.embeddings"
    others = [f"passes.{j}.{q.name}" for j, q in enumerate(job.passes)
              if q is not p and getattr(getattr(q, "config", None), "embeddings", None) is not None]
    if others:
        raise UsageError(f"{at}: {others[0]} quantizes the embeddings too; set `embeddings` on one pass")
    if p.config.embeddings.method == "gptq" and p.head_solver() is None:
        raise UsageError(f"{at}.method: gptq solves the head with the gptq pass's solver; {p.name} rounds it with rtn "
                         "(method: rtn or auto), or set `embeddings` on a gptq pass")
    if getattr(job.export, "format", None) == "gguf":
        raise UsageError(f"{at}: a GGUF export stores token_embd and output in its type's own grids (--gguf); drop `embeddings` "
                         "(--embeddings), or export to compressed-tensors")
    if job.model is None:
        return
    name, emb = _plain_lookup(job.model, at)
    head = job.model.get_output_embeddings()
    rotated = any("rotate" in q.effects for q in job.passes[: job.passes.index(p)])  # a rotation before unties the head
    tied = head is not None and bool(getattr(job.model_config, "tie_word_embeddings", False)) and not rotated
    widths = {name: emb.embedding_dim}
    if head is not None and not tied:
        widths[next(n for n, m in job.model.named_modules() if m is head)] = head.in_features
    for what, width in widths.items():
        g = embedding_group(p.config, width)
        if g != -1 and width % g:
            ok = [x for x in (128, 64, 32, 16) if width % x == 0][:2]
            raise UsageError(f"{at}.group_size: {g} does not divide the width {width} of {what}; use "
                             f"{' or '.join(map(str, ok)) or 'auto'}, or -1 (one scale per row)")
    _check_target(at, p.config, job, tied, emb.embedding_dim)
