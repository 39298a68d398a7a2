"""``CodebookLinear``: a Linear stored as per-row codebooks and packed codes (SqueezeLLM,
``compress.quant.codebook``), and how exports store it.

Buffers (the state_dict is what the exporter writes):
  weight_codes   uint8 (out, ⌈in/8⌉·bits)  each row's codes, ``bits`` bits each, packed as one bit
                                           stream, least significant bit first: code j holds bits
                                           [j·bits, (j+1)·bits) of the row; rows are padded with
                                           zero codes to a multiple of 8, so 8 codes fill ``bits``
                                           bytes (3-bit: 8 codes in 3 bytes)
  weight_tables  (out, 2^bits) storage dtype (bf16 from a bf16 checkpoint)  row r's table, ascending
  bias           (out,) frozen Parameter in the storage dtype, when the Linear has one

``compress.json`` lists the codebook layers under ``codebook.layers`` ({name: {bits, in_features}},
``codebook_metadata`` writes the section) with the packing; ``stored_layers`` and
``from_checkpoint`` read it. No compressed-tensors or GGUF format stores codebooks: only our
runtime (``compress.load``) reads these layers. The forward (``kernel`` names the backend that ran):

* ``triton`` on CUDA: the Triton lookup-dequantize GEMM (``compress.kernels.triton_codebook``: the
  codes read as exported, each table entry gathered in the kernel);
* ``cpu`` on the CPU (2, 3 and 4-bit codes, bf16 or float32 x, where the CPU has AVX-512 BW and
  BF16): compress's lookup kernel (``compress.kernels.codebook_cpu``), also straight from the
  exported codes, with no dense weight; looked-up tiles and torch's GEMM for prefill;
* ``torch`` elsewhere, under ``keep_dense`` (evaluation), for a forward that autograd
  differentiates through x, and for ``backend='torch'``: the reference, ``tables.gather(codes)``
  then a matmul (the dequantized weight kept between forwards under ``keep_dense``).

``backend`` ('triton', 'cpu', 'torch'; None: automatic) forces one; a forced kernel that cannot
run raises UsageError.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.checkpoint.source import section_layers
from compress.errors import InputError, UsageError
from compress.kernels import codebook_cpu, missing, record_kernel
from compress.kernels.reference import cache_dense, wna16_linear
from compress.modules import COMPRESS, CompressedLinear, register_module_type

PACKING = "lsb-first bit stream per row, padded to a multiple of 8 codes (8 codes in `bits` bytes)"
SECTION = "codebook"  # compress.json section


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per row of ``in_features`` codes of ``bits`` bits: ⌈in/8⌉ groups of 8 codes in ``bits`` bytes."""
    return -(-in_features // 8) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (out, in), values < 2^bits -> uint8 (out, ⌈in/8⌉·bits), the layout above."""
    out_f, in_f = codes.shape
    c = torch.zeros(out_f, -(-in_f // 8) * 8, dtype=torch.int32, device=codes.device)
    c[:, :in_f] = codes.to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=codes.device)
    stream = (c[..., None] >> shifts) & 1  # (out, in8, bits): bit i of code j is stream bit j·bits + i
    stream = stream.reshape(out_f, -1, 8)  # (out, bytes, 8): 8 consecutive bits per byte, LSB first
    return (stream << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 (out, bytes) -> uint8 codes (out, in_features)."""
    out_f = packed.shape[0]
    p = packed.to(torch.int32)
    stream = (p[..., None] >> torch.arange(8, dtype=torch.int32, device=p.device)) & 1  # (out, bytes, 8)
    stream = stream.reshape(out_f, -1, bits)[:, :in_features]  # (out, in, bits)
    return (stream << torch.arange(bits, dtype=torch.int32, device=p.device)).sum(-1).to(torch.uint8)


@register_module_type
class CodebookLinear(CompressedLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = False,
                 table_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.register_buffer("weight_codes", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("weight_tables", torch.zeros(out_features, 1 << bits, dtype=table_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=table_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, tables: torch.Tensor, bits: int,
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> CodebookLinear:
        """codes (out, in) < 2^bits, tables (out, 2^bits) and the bias (out,): the tables and the
        bias are stored in ``dtype`` (the checkpoint's: what the export holds)."""
        m = cls(codes.shape[1], codes.shape[0], bits, bias=bias is not None, table_dtype=dtype)
        m.weight_codes.copy_(pack_codes(codes, bits))
        m.weight_tables.copy_(tables.to(dtype))
        if bias is not None:
            m.bias.data = bias.detach().to(dtype).clone()
        return m

    def codes(self) -> torch.Tensor:
        """uint8 (out, in)."""
        return unpack_codes(self.weight_codes, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in): each row's codes looked up in its table."""
        return self.weight_tables.float().gather(1, self.codes().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._on_triton(x):
            self.kernel = record_kernel("triton")
            from compress.kernels.triton_codebook import codebook_gemm

            y = codebook_gemm(x.reshape(-1, self.in_features), self.weight_codes, self.weight_tables, self.bits, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self._on_cpu_kernel(x):
            self.kernel = record_kernel("cpu")
            y = codebook_cpu.codebook_linear(x.reshape(-1, self.in_features), self.weight_codes, self.weight_tables, self.bits, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        self.kernel = record_kernel("torch")
        return wna16_linear(x, self)  # the looked-up weight (kept between calls under keep_dense), then a matmul

    def _on_triton(self, x: torch.Tensor) -> bool:
        """The Triton lookup-dequantize GEMM on CUDA tensors (automatic) or where ``backend`` is
        'triton' (the CPU under TRITON_INTERPRET=1: the tests); not under ``keep_dense``, nor
        automatically on the CPU (``_on_cpu_kernel``)."""
        backend = getattr(self, "backend", None)
        if self.__dict__.get("_keep_dense") or backend not in (None, "triton") or (backend is None and x.device.type != "cuda"):
            return False
        why = missing("triton", x.device, op="codebook")
        if why and backend == "triton":
            raise UsageError(f"kernel backend 'triton' cannot run codebook layers here: {why}")
        return why is None

    def _on_cpu_kernel(self, x: torch.Tensor) -> bool:
        """compress's CPU lookup kernel for CPU tensors, automatic or where ``backend`` is 'cpu'; the
        torch reference under ``keep_dense`` and where autograd differentiates this forward (the
        kernel records no graph)."""
        backend = getattr(self, "backend", None)
        if backend not in (None, "cpu") or self.__dict__.get("_keep_dense"):
            return False
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return False
        why = codebook_cpu.unsupported(self.bits, x.dtype) if x.device.type == "cpu" else f"the CPU kernel needs tensors on the CPU (they are on {x.device})"
        if why and backend == "cpu":
            raise UsageError(f"kernel backend 'cpu' cannot run codebook layers here: {why}")
        return why is None

    # the compressed-module protocol (compress.modules)
    def dense_weight(self) -> torch.Tensor:
        return self.dequantize()

    def keep_dense(self, on: bool = True) -> bool:
        cache_dense(self, on)
        return True

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight: the packed codes and the tables (bias excluded). 3 bits, 576
        columns, bf16 tables: (216 bytes + 8 entries × 2 bytes) × 8 / 576 = 3.22."""
        stored = self.weight_codes.numel() * 8 + self.weight_tables.numel() * self.weight_tables.element_size() * 8
        return stored / (self.in_features * self.out_features)

    @classmethod
    def refusal(cls, spec: dict, runtime: str) -> str | None:
        if runtime == COMPRESS:
            return None
        return (f"{runtime} has no reader for non-uniform codebook layers (SqueezeLLM: a lookup table per row, which neither "
                "compressed-tensors nor GGUF stores); compress.load reads them")

    @classmethod
    def stored_layers(cls, source) -> list[str]:
        return sorted(section_layers(source.path, SECTION))

    @classmethod
    def stored_parameters(cls, source, name: str) -> int:
        """The original weight's element count: rows (the tables') × ``in_features`` (compress.json)."""
        rows = source.tensor_info([f"{name}.weight_tables"])[f"{name}.weight_tables"][0][0]
        return rows * int(section_layers(source.path, SECTION)[name]["in_features"])

    @classmethod
    def from_checkpoint(cls, source, name, linear, groups) -> CodebookLinear:
        info = section_layers(source.path, SECTION)[name]
        bits, in_f = int(info["bits"]), int(info["in_features"])
        tensors = source.read([f"{name}.weight_codes", f"{name}.weight_tables"] + ([f"{name}.bias"] if linear.bias is not None else []))
        m = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, table_dtype=tensors[f"{name}.weight_tables"].dtype)
        bad = [f"{k} {tuple(tensors[f'{name}.{k}'].shape)}, not {tuple(v.shape)}" for k, v in m.state_dict().items()
               if tuple(tensors[f"{name}.{k}"].shape) != tuple(v.shape)]
        if in_f != linear.in_features or bad or tensors[f"{name}.weight_codes"].dtype != torch.uint8:
            raise InputError(f"{source.path}: codebook layer {name} ({bits}-bit, {in_f} columns in compress.json) does not match a "
                              f"{linear.in_features}-column Linear of {linear.out_features} rows: {'; '.join(bad) or 'codes not uint8'}")
        m.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items()})
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def codebook_metadata(layers: list) -> dict | None:
    """The ``codebook`` section of ``compress.json`` from the run's ``LayerReport``s: those the
    squeezellm pass ran on carry ``codebook_bits`` and ``in_features`` in their info (prefixed
    ``A.``/``B.`` on a low-rank layer's factors, which are then the stored layers). None when
    no layer is a codebook layer."""
    out = {}
    for r in layers:
        for k, bits in r.info.items():
            if k.endswith("codebook_bits"):
                sub = k[: -len("codebook_bits")]  # "" or "A." / "B."
                out[f"{r.name}.{sub}".rstrip(".")] = {"bits": bits, "in_features": r.info[f"{sub}in_features"]}
    if not out:
        return None
    return {"method": "squeezellm", "packing": PACKING, "layers": dict(sorted(out.items()))}
