"""``GGMLLinear``: a Linear whose weight is held exactly as a GGUF file stores it.

The quantization passes make one when the export is GGUF (``--gguf TYPE``): the solver chose
codes on llama.cpp's grid for this tensor (``compress.quant.ggml``), and the module keeps the
encoded blocks, the bytes the exporter writes into ``model.gguf`` unchanged. Its weight is what
the ``gguf`` package's own dequantizer (the one transformers' GGUF loader and our GGUF input
use) reads from those bytes, so the model evaluated in memory, the file, and the file read back
by ``compress eval OUT/model.gguf`` compute with one weight.

Buffers (the state_dict is what the exporter writes):
  weight_ggml   uint8  (out, bytes per row)  the row-major GGUF blocks
  ggml_type     int32  (1,)                  the GGMLQuantizationType
  bias          (out,)                       frozen Parameter, when the Linear has one (stored F32)

Only llama.cpp and GGUF readers load these (no compressed-tensors format stores them).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from torch import nn

from compress.kernels.reference import cache_dense, wna16_linear
from compress.modules import COMPRESS, CompressedLinear, register_module_type

LLAMA_CPP = "llama.cpp"


@register_module_type
class GGMLLinear(CompressedLinear):
    kernel = "torch"

    def __init__(self, in_features: int, out_features: int, qtype: gguf.GGMLQuantizationType, row_bytes: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_ggml", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("ggml_type", torch.tensor([int(qtype)], dtype=torch.int32))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # gguf's numpy dequantizer is slow to run per call: the weight is kept between forwards
        # (rebuilt when the blocks change), as keep_dense does for packed layers
        cache_dense(self)

    @classmethod
    def from_blocks(cls, data: np.ndarray, qtype: gguf.GGMLQuantizationType, in_features: int,
                    bias: torch.Tensor | None = None) -> GGMLLinear:
        """``data``: uint8 (out, bytes per row), as ``compress.quant.ggml.encode`` returns it."""
        m = cls(in_features, data.shape[0], qtype, data.shape[1], bias)
        m.weight_ggml.copy_(torch.from_numpy(np.ascontiguousarray(data)))
        return m

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType(int(self.ggml_type[0]))

    @property
    def type_name(self) -> str:
        return self.qtype.name.lower()

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in), by the gguf package's dequantizer, on the module's device."""
        w = gguf.quants.dequantize(self.weight_ggml.cpu().numpy(), self.qtype)
        w = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(self.out_features, self.in_features)
        return w.to(self.weight_ggml.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the torch reference path: the dequantized weight, kept between calls (see __init__)
        return wna16_linear(x, self)

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def quant_spec(self) -> dict:
        return {"format": "gguf", "type": self.type_name}

    def keep_dense(self, on: bool = True) -> bool:
        cache_dense(self, on)
        return True

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        if runtime in (COMPRESS, LLAMA_CPP):
            return None
        return f"{runtime} does not read GGUF files (llama.cpp and compress eval/load read model.gguf)"

    @property
    def bits_per_weight(self) -> float:
        return self.weight_ggml.numel() * 8 / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.type_name}, bias={self.bias is not None}"
