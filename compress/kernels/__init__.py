"""Packed-int kernels, and the dispatcher that picks one per call (``dispatch``).

Backends: ``torch`` (``reference``: the float32 CPU path and the oracle of every test), ``cpu``
(``cpu``: compress's AVX-512 int4 kernel (``native``) or torch's int4/int8 CPU kernels, and oneDNN's int8 GEMM, bf16 activations), ``triton``
(``triton_kernels``: on a CUDA GPU, or the CPU under ``TRITON_INTERPRET=1``) and ``cuda``
(``cuda_kernel``: a CUDA C++ decode kernel built with nvcc at first use). ``dispatch`` says how
one is chosen (argument, module, ``$COMPRESS_KERNEL``, automatic) and the kernels' weight layout;
``sparse24`` holds 2:4 semi-structured weights, ``runtime`` greedy generation with a chosen
kernel. This package imports no compressed module type: the calls take the module's buffers.
"""

from compress.kernels.dispatch import (
    BACKENDS,
    CUDA_MAX_TOKENS,
    ENV,
    KernelWeights,
    choose,
    cpu_weights,
    int8_linear,
    kernel_weights,
    last_kernel,
    missing,
    quantize_per_token,
    record_kernel,
    requested_backend,
    wna16_linear,
)
from compress.kernels.reference import cache_dense, dense_weight_cached

__all__ = [
    "BACKENDS", "CUDA_MAX_TOKENS", "ENV", "KernelWeights", "cache_dense", "choose", "cpu_weights", "dense_weight_cached", "int8_linear",
    "kernel_weights", "last_kernel", "missing", "quantize_per_token", "record_kernel", "requested_backend", "wna16_linear",
]
