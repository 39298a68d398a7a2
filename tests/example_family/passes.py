"""The pass adapter: its options, what it does to a Linear, and the ``apply`` stage."""

from pydantic import BaseModel, ConfigDict, Field

from compress.passes import Pass, exclusive, register
from example_family.binarize import binarize
from example_family.module import SignLinear


class SignConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


@register
class SignPass(Pass):
    """1-bit weights: α_r · sign(W_r) per output row."""

    name = "sign"
    Config = SignConfig
    effects = frozenset({"quantize"})  # so the other families' ordering rules see it

    def conflicts(self, planned):
        return exclusive(self, planned, "quantize", "quantization")

    def apply(self, full_name, module, stats):
        signs, alpha = binarize(module.weight.detach())
        m = SignLinear(module.in_features, module.out_features, bias=module.bias is not None)
        m.weight_sign.copy_(signs)
        m.weight_scale.copy_(alpha)
        if module.bias is not None:
            m.bias.data.copy_(module.bias.detach().float())
        return m, {"alpha_mean": float(alpha.mean())}
