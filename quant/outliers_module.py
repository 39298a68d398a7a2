"""``OutlierQuantLinear``: a packed quantized Linear plus weights kept in 16 bit beside it: per
input column its ``k`` outlier weights (SpQR's dense-and-sparse, with a fixed count per column:
``gptq: {outliers: 0.005}``), and/or whole input columns (OWQ's weak columns:
``gptq: {weak_columns: 8}``), and how exports store it.

Buffers (the state_dict is what the exporter writes): ``QuantLinear``'s (weight_packed,
weight_scale, weight_zero_point when asymmetric, weight_g_idx with visiting-order groups,
weight_shape, bias), and, each pair only when its count is not 0,

  weight_outlier_rows    int16 (int32 from 32768 rows)     (in, k)   column j's kept rows
  weight_outlier_values  storage dtype (bf16)              (in, k)   their values
  weight_weak_columns    int16 (int32 from 32768 columns)  (c,)      the weak columns, ascending
  weight_weak_values     storage dtype (bf16)              (out, c)  their values

Ŵ is the packed weight with ``Ŵ[rows[j, i], j] = outlier_values[j, i]``, then
``Ŵ[:, columns[i]] = weak_values[:, i]``. The packed codes of a weak column are its group's zero
point (0 there), so the overwrite and a split product (``x Ŵ_packedᵀ + x[:, columns] weak_valuesᵀ``)
compute the same. ``compress.json`` lists the layers under ``outliers.layers`` ({name: {bits,
group_size, symmetric, act_order, per_column, weak_columns, in_features}}; ``outlier_metadata``);
they have no compressed-tensors group, so transformers and vLLM (which would read the packed part
and drop the kept weights: another model) refuse the export, and only our runtime
(``compress.load``) reads it, through the torch reference (dequantize with the kept weights in
place, then a matmul). One type holds both kinds, so a layer may have both (the kept weights of a
weak column are then its first rows, the same values).
"""

from __future__ import annotations

import torch

from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.source import section_layers
from compress.errors import InputError
from compress.kernels import record_kernel, reference
from compress.modules import COMPRESS, register_module_type

SECTION = "outliers"  # compress.json section


def rows_dtype(out_features: int) -> torch.dtype:
    """The index dtype of ``out_features`` rows (or columns)."""
    return torch.int16 if out_features < 1 << 15 else torch.int32


@register_module_type
class OutlierQuantLinear(QuantLinear):
    group_format = None  # stored outside compressed-tensors' groups (see the module docstring)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool, per_column: int,
                 has_g_idx: bool = False, bias: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                 bias_dtype: torch.dtype = torch.float32, value_dtype: torch.dtype = torch.bfloat16, weak_columns: int = 0):
        super().__init__(in_features, out_features, bits, group_size, symmetric, has_g_idx, bias, scale_dtype, bias_dtype, dense=True)
        if per_column < 0 or not 0 <= weak_columns < in_features or not per_column and not weak_columns:
            raise ValueError(f"outlier layer: per_column {per_column}, weak_columns {weak_columns} of {in_features} columns: "
                             "one of them kept, and not every column")
        self.per_column, self.weak_columns = per_column, weak_columns
        if per_column:
            self.register_buffer("weight_outlier_rows", torch.zeros(in_features, per_column, dtype=rows_dtype(out_features)))
            self.register_buffer("weight_outlier_values", torch.zeros(in_features, per_column, dtype=value_dtype))
        if weak_columns:
            self.register_buffer("weight_weak_columns", torch.arange(weak_columns, dtype=rows_dtype(in_features)))
            self.register_buffer("weight_weak_values", torch.zeros(out_features, weak_columns, dtype=value_dtype))

    @classmethod
    def from_outliers(cls, result, bias: torch.Tensor | None, bias_dtype: torch.dtype | None, value_dtype: torch.dtype) -> OutlierQuantLinear:
        """A ``QuantResult`` whose ``outliers`` and/or ``weak`` are set (``gptq_quantize(...,
        outliers=k, weak_columns=c)``)."""
        base = QuantLinear.from_result(result, bias=bias, bias_dtype=bias_dtype)
        if not base.dense:
            raise ValueError("outlier layers store the dense bit layout")
        s = result.scheme
        per_column = 0 if result.outliers is None else result.outliers[0].shape[1]
        weak = 0 if result.weak is None else result.weak[0].numel()
        m = cls(base.in_features, base.out_features, s.bits, s.group_size, s.symmetric, per_column, has_g_idx=result.act_order,
                bias=bias is not None, scale_dtype=s.scale_dtype, bias_dtype=base.bias.dtype if bias is not None else torch.float32,
                value_dtype=value_dtype, weak_columns=weak)
        state = base.state_dict()
        if per_column:
            rows, values = result.outliers
            state |= {"weight_outlier_rows": rows.to(m.weight_outlier_rows.dtype), "weight_outlier_values": exact(values, value_dtype)}
        if weak:
            cols, values = result.weak
            state |= {"weight_weak_columns": cols.to(m.weight_weak_columns.dtype), "weight_weak_values": exact(values, value_dtype)}
        m.load_state_dict(state)
        return m

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): the packed weight with the outliers, then the weak columns, in place."""
        w = super().dequantize()
        if self.per_column:
            cols = torch.arange(self.in_features, device=w.device)[:, None].expand(-1, self.per_column)
            w[self.weight_outlier_rows.long(), cols] = self.weight_outlier_values.float()
        if self.weak_columns:
            w[:, self.weight_weak_columns.long()] = self.weight_weak_values.float()
        return w

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the packed part's (codes, scales, zero points, g_idx) plus the
        kept weights and their indices (16 + 16 bits per outlier; 16 per weak-column weight and 16
        per weak column)."""
        kept = [getattr(self, k) for k in ("weight_outlier_rows", "weight_outlier_values", "weight_weak_columns", "weight_weak_values")
                if hasattr(self, k)]
        extra = sum(t.numel() * t.element_size() * 8 for t in kept)
        return super().bits_per_weight + extra / (self.in_features * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the packed kernels would read the codes without the outliers: the reference path only
        self.kernel = record_kernel("torch")
        return reference.wna16_linear(x, self)

    # the compressed-module protocol (compress.modules)
    def quant_spec(self) -> None:  # no compressed-tensors group: see the module docstring
        return None

    def trainable(self, train: str) -> None:
        return None

    @classmethod
    def reads_group(cls, scheme: dict) -> bool:
        return False

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        if runtime == COMPRESS:
            return None
        return (f"{runtime} has no reader for outlier weights or weak columns kept beside the packed codes (SpQR's dense-and-sparse "
                "layers, OWQ's weak columns: gptq outliers, weak_columns); it would drop them and compute another model. compress.load "
                "reads them; drop outliers and weak_columns for other runtimes")

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return sorted(section_layers(source.path, SECTION))

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        info = section_layers(source.path, SECTION)[name]
        rows = source.tensor_info([f"{name}.weight_scale"])[f"{name}.weight_scale"][0][0]
        return rows * int(info["in_features"])

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> OutlierQuantLinear:
        info = section_layers(source.path, SECTION)[name]
        keys = [k for k in source.weight_map if k.rpartition(".")[0] == name]
        # (an export where every quantized layer has outliers holds an empty `weight` there: the sentinel transformers stops on)
        tensors = {k.rpartition(".")[2]: v for k, v in source.read(keys).items() if not k.endswith(".weight")}
        try:
            values = tensors.get("weight_outlier_values", tensors.get("weight_weak_values"))
            m = cls(linear.in_features, linear.out_features, int(info["bits"]), int(info["group_size"]), bool(info["symmetric"]),
                    int(info["per_column"]), has_g_idx=bool(info.get("act_order")), bias=linear.bias is not None,
                    scale_dtype=tensors["weight_scale"].dtype, bias_dtype=tensors["bias"].dtype if "bias" in tensors else torch.float32,
                    value_dtype=values.dtype if values is not None else torch.bfloat16, weak_columns=int(info.get("weak_columns", 0)))
            bad = [f"{k} {tuple(tensors[k].shape) if k in tensors else 'missing'}, not {tuple(v.shape)}"
                   for k, v in m.state_dict().items() if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape)]
        except (KeyError, ValueError) as e:
            bad = [str(e)]
        if int(info.get("in_features", -1)) != linear.in_features or bad:
            raise InputError(f"{source.path}: outlier layer {name} (compress.json outliers) does not match a {linear.in_features}-column "
                             f"Linear of {linear.out_features} rows: {'; '.join(bad) or 'in_features differs'}")
        m.load_state_dict(tensors)
        return m

    def extra_repr(self) -> str:
        return super().extra_repr() + f", outliers per column={self.per_column}, weak columns={self.weak_columns}"


def exact(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, which must hold them exactly (what was measured is what is stored)."""
    out = values.to(dtype)
    if not torch.equal(out.float(), values.float()):
        raise ValueError(f"kept values are not exact in {dtype}: quantize with outlier_dtype={dtype}")
    return out


def outlier_metadata(layers: list) -> dict | None:
    """The ``outliers`` section of ``compress.json`` from the run's ``LayerReport``s: the layers the
    gptq pass kept outliers or weak columns in carry ``outliers_per_column`` and/or
    ``weak_columns`` and their scheme in their info. None when no layer has either."""
    keys = ("bits", "group_size", "symmetric", "act_order", "in_features")
    out = {r.name: {"per_column": r.info.get("outliers_per_column", 0), "weak_columns": r.info.get("weak_columns", 0),
                    **{k: r.info[f"outliers_{k}"] for k in keys}}
           for r in layers if r.info.get("outliers_per_column") or r.info.get("weak_columns")}
    return {"layers": out} if out else None
