"""``OutlierQuantLinear``: a packed quantized Linear plus, per input column, its ``k`` outlier
weights kept in 16 bit (SpQR's dense-and-sparse, with a fixed count per column:
``gptq: {outliers: 0.005}``), and how exports store it.

Buffers (the state_dict is what the exporter writes): ``QuantLinear``'s (weight_packed,
weight_scale, weight_zero_point when asymmetric, weight_g_idx with act-order groups, weight_shape,
bias), and

  weight_outlier_rows    int16 (int32 from 32768 rows)  (in, k)  column j's kept rows
  weight_outlier_values  storage dtype (bf16)           (in, k)  their values

Ŵ is the packed weight with ``Ŵ[rows[j, i], j] = values[j, i]``. ``compress.json`` lists the
layers under ``outliers.layers`` ({name: {bits, group_size, symmetric, act_order, per_column,
in_features}}; ``outlier_metadata``); they have no compressed-tensors group, so transformers and
vLLM (which would read the packed part and drop the outliers: another model) refuse the export,
and only our runtime (``compress.load``) reads it, through the torch reference (dequantize with
the outliers in place, then a matmul).
"""

from __future__ import annotations

import torch

from compress.checkpoint.formats import QuantLinear
from compress.checkpoint.source import read_metadata
from compress.errors import InputError
from compress.kernels import record_kernel, reference
from compress.modules import COMPRESS, register_module_type

SECTION = "outliers"  # compress.json section


def rows_dtype(out_features: int) -> torch.dtype:
    return torch.int16 if out_features < 1 << 15 else torch.int32


@register_module_type
class OutlierQuantLinear(QuantLinear):
    group_format = None  # stored outside compressed-tensors' groups (see the module docstring)

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool, per_column: int,
                 has_g_idx: bool = False, bias: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                 bias_dtype: torch.dtype = torch.float32, value_dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features, bits, group_size, symmetric, has_g_idx, bias, scale_dtype, bias_dtype, dense=True)
        self.per_column = per_column
        self.register_buffer("weight_outlier_rows", torch.zeros(in_features, per_column, dtype=rows_dtype(out_features)))
        self.register_buffer("weight_outlier_values", torch.zeros(in_features, per_column, dtype=value_dtype))

    @classmethod
    def from_outliers(cls, result, bias: torch.Tensor | None, bias_dtype: torch.dtype | None, value_dtype: torch.dtype) -> OutlierQuantLinear:
        """A ``QuantResult`` whose ``outliers`` are set (``gptq_quantize(..., outliers=k)``)."""
        rows, values = result.outliers
        base = QuantLinear.from_result(result, bias=bias, bias_dtype=bias_dtype)
        s = result.scheme
        m = cls(base.in_features, base.out_features, s.bits, s.group_size, s.symmetric, rows.shape[1], has_g_idx=result.act_order,
                bias=bias is not None, scale_dtype=s.scale_dtype, bias_dtype=base.bias.dtype if bias is not None else torch.float32,
                value_dtype=value_dtype)
        if not base.dense:
            raise ValueError("outlier layers store the dense bit layout")
        vals = values.to(value_dtype)
        if not torch.equal(vals.float(), values.float()):
            raise ValueError(f"outlier values are not exact in {value_dtype}: quantize with outlier_dtype={value_dtype}")
        m.load_state_dict({**base.state_dict(), "weight_outlier_rows": rows.to(m.weight_outlier_rows.dtype), "weight_outlier_values": vals})
        return m

    def dequantize(self) -> torch.Tensor:
        w = super().dequantize()
        cols = torch.arange(self.in_features, device=w.device)[:, None].expand(-1, self.per_column)
        w[self.weight_outlier_rows.long(), cols] = self.weight_outlier_values.float()
        return w

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
        return (f"{runtime} has no reader for outlier weights kept beside the packed codes (SpQR's dense-and-sparse layers, "
                "gptq outliers); it would drop them and compute another model. compress.load reads them; drop outliers for other runtimes")

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return sorted(read_metadata(source.path).get(SECTION, {}).get("layers", {}))

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        info = read_metadata(source.path)[SECTION]["layers"][name]
        rows = source.tensor_info([f"{name}.weight_scale"])[f"{name}.weight_scale"][0][0]
        return rows * int(info["in_features"])

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> OutlierQuantLinear:
        info = read_metadata(source.path)[SECTION]["layers"][name]
        keys = [k for k in source.weight_map if k.rpartition(".")[0] == name]
        # (an export where every quantized layer has outliers holds an empty `weight` there: the sentinel transformers stops on)
        tensors = {k.rpartition(".")[2]: v for k, v in source.read(keys).items() if not k.endswith(".weight")}
        try:
            m = cls(linear.in_features, linear.out_features, int(info["bits"]), int(info["group_size"]), bool(info["symmetric"]),
                    int(info["per_column"]), has_g_idx=bool(info.get("act_order")), bias=linear.bias is not None,
                    scale_dtype=tensors["weight_scale"].dtype, bias_dtype=tensors["bias"].dtype if "bias" in tensors else torch.float32,
                    value_dtype=tensors["weight_outlier_values"].dtype)
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
        return super().extra_repr() + f", outliers per column={self.per_column}"


def outlier_metadata(layers: list) -> dict | None:
    """The ``outliers`` section of ``compress.json`` from the run's ``LayerReport``s: the layers the
    gptq pass kept outliers in carry ``outliers_per_column`` and their scheme in their info. None
    when no layer has outliers."""
    keys = ("bits", "group_size", "symmetric", "act_order", "in_features")
    out = {r.name: {"per_column": r.info["outliers_per_column"], **{k: r.info[f"outliers_{k}"] for k in keys}}
           for r in layers if r.info.get("outliers_per_column")}
    return {"layers": out} if out else None
