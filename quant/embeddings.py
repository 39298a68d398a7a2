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

A tensor train in place of the table (``tt_rank`` and/or ``tt_error``, instead of ``bits``;
``compress.quant.tt``, ``compress.quant.tt_module.TTEmbedding``): TT-SVD of the table before block 0,
the lookup built from the cores; read by our runtime only. It stands for the input lookup only: a
tied lm_head is untied (stored apart; config.json ``tie_word_embeddings: false``) and kept dense in
the checkpoint's dtype, or with ``head_bits`` quantized as an untied head is above (``method``,
``group_size``); an untied head is left as it is unless ``head_bits`` is set.
"""

from __future__ import annotations

from typing import Literal

import torch
from compress.quant.rtn import QuantScheme, rtn_quantize
from compress.quant.tt import tt_shape, tt_svd
from compress.quant.tt_module import TTEmbedding, tt_info
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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

    # the widths vLLM's quantized-embedding lookup serves; 4 unless the table is a tensor train
    bits: Literal[4, 8] | None = None
    # how the head (a tied table: the table) is rounded: gptq on its calibration inputs after the
    # last block, or rtn; auto: gptq where the pass is gptq, else rtn
    method: Literal["auto", "rtn", "gptq"] = "auto"
    # hidden-dimension columns per scale; auto: the pass's own group_size (its auto: 128 where it
    # divides the table's width, else the largest power of two >= 16 that does, else -1); -1: per row
    group_size: int | Literal["auto"] = "auto"

    # TensorGPT's tensor train in place of the table (our runtime only; exclusive with bits): the
    # largest rank between cores, and/or the relative error ‖E − Ê‖_F / ‖E‖_F the ranks are cut to
    tt_rank: int | None = Field(None, ge=1)
    tt_error: float | None = Field(None, gt=0, lt=1)
    # the cores d: vocabulary and width each in d balanced factors (49152 rows -> 36·37·37, padded; 576 -> 8·8·9)
    tt_cores: int = Field(3, ge=2, le=6)
    # beside a TT table, the lm_head (a tied one untied): None keeps it dense (the checkpoint's
    # dtype), 4 or 8 quantizes it as an untied head is (method, group_size)
    head_bits: Literal[4, 8] | None = None

    @field_validator("group_size", mode="before")
    @classmethod
    def _group(cls, v):
        return group_option(v)

    @model_validator(mode="after")
    def _table(self):
        if self.tt:
            if self.bits is not None:
                raise ValueError("tt_rank/tt_error and bits exclude each other: bits quantizes the table, tt_rank factors "
                                 "it as a tensor train (--embeddings-tt); head_bits quantizes the lm_head beside a TT table")
        elif self.head_bits is not None:
            raise ValueError("head_bits is the lm_head's width beside a tensor-train table (tt_rank); a quantized table's "
                             "head takes bits")
        elif self.bits is None:
            self.bits = 4
        return self

    @property
    def tt(self) -> bool:
        """The table is a tensor train (``tt_rank`` or ``tt_error`` set)."""
        return self.tt_rank is not None or self.tt_error is not None


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
    if config.embeddings.tt:
        return tt_outside(stage, config, dtype, solve)
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


def tt_outside(stage, config, dtype: torch.dtype, solve=None) -> dict[str, tuple[nn.Module, dict]]:
    """``quantize_outside`` for a TT table: the table by TT-SVD before block 0; the head (untied)
    dense, or at ``head_bits`` by RTN before block 0 or by ``solve`` after the last block."""
    e = config.embeddings
    head_cfg = None if e.head_bits is None else config.model_copy(update={"embeddings": e.model_copy(update={"bits": e.head_bits})})
    gptq = head_cfg is not None and solve is not None and e.method != "rtn" and stage.head is not None
    out = {}
    if stage.phase == "before":
        out[stage.embedding] = _tt_table(stage, e, dtype)
        if stage.head is not None and not gptq and (stage.tied or head_cfg is not None):
            out[stage.head] = _head_apart(stage, head_cfg, dtype)
    elif gptq:
        W, res, err = _solved(stage, head_cfg, dtype, solve)  # W: the table where tied
        m = QuantLinear.from_result(res, bias=stage.bias(stage.head), bias_dtype=dtype)
        out[stage.head] = (m, _info(W, m.dense_weight(), res, method="gptq", untied=stage.tied, rel_output_error=err))
    return out


def _tt_table(stage, e: EmbeddingsConfig, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    W = stage.weight(stage.embedding)  # (V, D)
    shape = tt_shape(W.shape[0], W.shape[1], e.tt_cores)
    m = TTEmbedding.from_cores(tt_svd(W, shape, e.tt_rank, e.tt_error), shape, stage.module(stage.embedding).padding_idx, dtype)
    err = float((m.dense_weight().to(W.device) - W).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
    return m, {**tt_info(m), "rel_weight_error": err, "method": "tt-svd", "untied_head": stage.tied}


def _head_apart(stage, head_cfg, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """The head beside a TT table, before block 0: a dense copy of a tied table (no ``head_cfg``),
    or rounded to nearest at ``head_cfg.embeddings.bits``."""
    source = stage.embedding if stage.tied else stage.head
    if head_cfg is None:
        W = stage.weight(source)  # (V, D)
        with torch.device("meta"):  # its weight is replaced at once: none allocated
            head = nn.Linear(W.shape[1], W.shape[0], bias=False)
        head.weight = nn.Parameter(W.to(dtype), requires_grad=False)
        return head, {"kept": "dense", "untied_from": stage.embedding}
    W, res = _rtn(stage, head_cfg, dtype, source)
    m = QuantLinear.from_result(res, bias=stage.bias(stage.head), bias_dtype=dtype)
    return m, _info(W, m.dequantize(), res, method="rtn", untied=stage.tied)


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
    if p.config.embeddings.tt:
        _check_tt(at, p.config, job)
        return
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
    _check_groups(at, p.config, widths)
    _check_target(at, p.config, job, tied, emb.embedding_dim)


def _check_groups(at: str, config, widths: dict[str, int]) -> None:
    """The group size divides each {layer: width}."""
    for what, width in widths.items():
        g = embedding_group(config, width)
        if g != -1 and width % g:
            ok = [x for x in (128, 64, 32, 16) if width % x == 0][:2]
            raise UsageError(f"{at}.group_size: {g} does not divide the width {width} of {what}; use "
                             f"{' or '.join(map(str, ok)) or 'auto'}, or -1 (one scale per row)")


def _check_tt(at: str, config, job) -> None:
    """A TT table: no GGUF, our runtime as the target, a plain lookup, the head's groups (``head_bits``)."""
    e = config.embeddings
    field = f"{at}.{'tt_rank' if e.tt_rank is not None else 'tt_error'}"
    if getattr(job.export, "format", None) == "gguf":
        raise UsageError(f"{field}: a GGUF export stores token_embd in llama.cpp's own types, which have no tensor train; "
                         "drop it (--embeddings-tt), or export to compressed-tensors (drop --gguf) and load with compress.load")
    target = getattr(job.export, "target", None)
    why = None if target is None else TTEmbedding.refusal({}, TARGETS[target])
    if why:
        raise UsageError(f"{field}: export.target is {target}, and {why}; use --target compress, or a quantized table "
                         f"(--embeddings 4|8, recipe `embeddings: {{bits: 4}}`) for {target}")
    if job.model is None:
        return
    _plain_lookup(job.model, at)
    head = job.model.get_output_embeddings()
    if head is not None and e.head_bits is not None:
        _check_groups(at, config, {next(n for n, m in job.model.named_modules() if m is head): head.in_features})
