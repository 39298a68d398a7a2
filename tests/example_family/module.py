"""The module type: stores the signs and scales, gives its dense weight, reloads itself."""

import torch
import torch.nn.functional as F

from compress.modules import CompressedLinear, register_module_type


@register_module_type
class SignLinear(CompressedLinear):
    """weight_sign int8 (out, in) in {-1, +1}; weight_scale float32 (out,) (scales keep their dtype in the export); bias (out,) or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_sign", torch.ones(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def dense_weight(self) -> torch.Tensor:
        return self.weight_scale[:, None] * self.weight_sign.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return [k[: -len(".weight_sign")] for k in source.weight_map if k.endswith(".weight_sign")]

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups):
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        tensors = source.read([f"{name}.{k}" for k in m.state_dict()])
        m.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()})
        return m
