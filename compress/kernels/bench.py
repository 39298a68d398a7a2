"""Benchmark the packed-int kernels (issue 5): time, bandwidth, speedup over bf16, and decode tokens/s.

For each scheme (W4A16: int4 g128 symmetric; W8A16: int8 g128 symmetric; W8A8: int8 per-channel
weights, per-token int8 activations), backend and shape (in_features × out_features) at each
number of tokens M, prints the median kernel time, the achieved memory bandwidth
(bytes of weights + scales + x + y over the time) as a fraction of the device-to-device copy
bandwidth measured first (read + write bytes of a 1 GiB copy), and the speedup over
``F.linear`` with bf16 weights. Weights are rotated among enough copies to exceed the GPU's L2
cache, so every call streams its weight from memory (as in decoding a real model). Then greedy
decoding tokens/s of a model, end to end through ``generate()``, at bf16 vs W4A16 vs W8A8
(RTN in memory, data-free, unless compressed checkpoints are given).

    python -m compress.kernels.bench               # a CUDA GPU: the issue's shapes and M (= compress bench)
    python -m compress.kernels.bench --model demo --decode-tokens 128 --json out/bench-kernels.json
    python -m compress.kernels.bench --cpu         # smoke run on tiny shapes (torch backend)

Without a GPU and without --cpu it says so and exits 0 (there is nothing to measure).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.checkpoint.load import load
from compress.errors import UsageError
from compress.kernels import int8_linear, missing, wna16_linear
from compress.quant.rtn import QuantScheme, rtn_quantize
from compress.utils import replace_linear

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (in_features K, out_features N)
MS = [1, 4, 16, 64, 256, 1024]
CPU_SHAPES = [(256, 384)]
CPU_MS = [1, 4, 33]
SCHEMES = ("w4a16", "w8a16", "w8a8")


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(dev, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), dev, reps=10)
    return 2 * nbytes / t


def _l2_bytes(dev) -> int:
    if dev.type == "cuda":
        return getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
    return 0  # the CPU smoke run: one copy of each weight (it measures nothing, it checks the script)


def make_layers(scheme: str, K: int, N: int, dev, copies: int):
    """``copies`` layers of one scheme with random weights, and the bytes one call reads."""


    w = torch.randn(N, K) * 0.02
    if scheme == "w8a8":
        r = rtn_quantize(w, QuantScheme(bits=8, group_size=-1, symmetric=True, observer="minmax"))
        layer = Int8Linear.from_result(r).to(dev)
    else:
        bits = 4 if scheme == "w4a16" else 8
        r = rtn_quantize(w, QuantScheme(bits=bits, group_size=128, symmetric=True, observer="minmax"))
        layer = QuantLinear.from_result(r).to(dev)
    nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    layers = [layer] + [_clone(layer) for _ in range(copies - 1)]
    return layers, nbytes


def _clone(layer):

    return copy.deepcopy(layer)


def run_kernels(dev, shapes, ms, schemes, backends, reps: int, log=print) -> list[dict]:

    rows = []
    bw = copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (64 << 20))
    log(f"device-to-device copy bandwidth: {bw / 1e9:.0f} GB/s")
    l2 = _l2_bytes(dev)
    dtype = torch.bfloat16
    for K, N in shapes:
        wbytes_bf16 = K * N * 2
        dense = [torch.randn(N, K, dtype=dtype, device=dev) * 0.02 for _ in range(max(1, -(-3 * l2 // wbytes_bf16)))]
        for scheme in schemes:
            copies = None
            for backend in backends:
                op = "w8a8" if scheme == "w8a8" else "wna16"
                why = missing(backend, dev, op=op, bits=None if op == "w8a8" else (4 if scheme == "w4a16" else 8))
                if why:
                    log(f"skip {scheme} {backend}: {why}")
                    continue
                if copies is None:
                    layers, nbytes = make_layers(scheme, K, N, dev, 1)
                    copies = max(1, -(-3 * l2 // nbytes))
                    layers += [_clone(layers[0]) for _ in range(copies - 1)]
                for M in ms:
                    if backend == "cuda" and M > 16:
                        continue  # the CUDA kernel is the decode path
                    x = torch.randn(M, K, dtype=dtype, device=dev)
                    it = iter(range(1 << 62))

                    def base():
                        F.linear(x, dense[next(it) % len(dense)])

                    if scheme == "w8a8":
                        def fn():
                            lay = layers[next(it) % len(layers)]
                            int8_linear(x, lay.weight, lay.weight_scale, None, backend=backend)
                    else:
                        def fn():
                            wna16_linear(x, layers[next(it) % len(layers)], backend=backend)

                    t_base = timeit(base, dev, reps)
                    t = timeit(fn, dev, reps)
                    io = nbytes + M * K * 2 + M * N * 2
                    row = dict(scheme=scheme, backend=backend, K=K, N=N, M=M, time_us=t * 1e6, bf16_us=t_base * 1e6,
                               speedup=t_base / t, bandwidth_gbs=io / t / 1e9, bandwidth_frac=io / t / bw)
                    rows.append(row)
                    log(f"{scheme:6} {backend:6} {K:>6}x{N:<6} M={M:<5} {row['time_us']:9.1f} us  bf16 {row['bf16_us']:9.1f} us  "
                        f"x{row['speedup']:5.2f}  {row['bandwidth_gbs']:7.0f} GB/s = {100 * row['bandwidth_frac']:5.1f}% of copy")
                del x
            copies = None
        del dense
    return rows


def tiny_model():
    """A small random llama in memory (the --cpu smoke run; no download)."""

    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def quantize_model(model, scheme: str):
    """RTN in memory (data-free): every Linear of the decoder blocks -> QuantLinear / Int8Linear."""


    names = [n for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]
    for n in names:
        lin = model.get_submodule(n)
        w = lin.weight.data.float()
        if scheme == "w8a8":
            r = rtn_quantize(w, QuantScheme(bits=8, group_size=-1, symmetric=True, observer="minmax"))
            new = Int8Linear.from_result(r, lin.bias)
        else:
            gs = 128 if w.shape[1] % 128 == 0 else -1
            r = rtn_quantize(w, QuantScheme(bits=4 if scheme == "w4a16" else 8, group_size=gs, symmetric=True, observer="minmax"))
            new = QuantLinear.from_result(r, lin.bias)
        replace_linear(model, n, new.to(lin.weight.device))
    return model


def run_decode(model_ref, dev, tokens: int, backend, cpu: bool, log=print) -> list[dict]:
    """Greedy decode tokens/s through generate(): bf16, then W4A16 and W8A8 of the same weights."""

    if cpu:
        base = tiny_model()
    else:

        base = load(model_ref, dtype=torch.float32, log=log)
    dtype = torch.float32 if cpu else torch.bfloat16
    rows = []
    ids = torch.arange(1, 17, device=dev).reshape(1, 16)
    for scheme in ("bf16", "w4a16", "w8a8"):
        m = copy.deepcopy(base)
        if scheme != "bf16":
            quantize_model(m, scheme)
        m = m.to(dev, dtype).eval()
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = backend
        gen = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            m.generate(ids, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up: builds, compiles
            _sync(dev)
            t = time.perf_counter()
            out = m.generate(ids, **gen)
            _sync(dev)
            dt = time.perf_counter() - t
        kernels_ran = sorted({getattr(mod, "kernel") for mod in m.modules() if hasattr(mod, "kernel") and hasattr(mod, "weight_scale")})
        row = dict(scheme=scheme, new_tokens=out.shape[1] - ids.shape[1], seconds=dt, tokens_per_s=(out.shape[1] - ids.shape[1]) / dt,
                   kernels=kernels_ran)
        rows.append(row)
        log(f"decode {scheme:6} {row['tokens_per_s']:8.1f} tokens/s ({row['new_tokens']} tokens, kernels: {', '.join(kernels_ran) or 'F.linear'})")
        del m
    return rows


def parse_shapes(shapes) -> list[tuple[int, int]]:
    """``["4096x14336", ...]`` (in x out) -> [(K, N), ...]; exit 2 for a malformed shape, or an in
    width the W4A16 layers' group size (128) does not divide."""
    out = []
    for s in shapes:
        try:
            K, N = (int(v) for v in s.lower().split("x")) if isinstance(s, str) else (int(v) for v in s)
        except ValueError:
            raise UsageError(f"--shape {s!r}: expected IN x OUT, e.g. 4096x14336") from None
        if K <= 0 or N <= 0 or K % 128:
            raise UsageError(f"--shape {s!r}: in must be a positive multiple of 128 (the W4A16 layers use group_size 128), out positive")
        out.append((K, N))
    return out


def run(cpu: bool = False, shapes=None, ms=None, schemes=SCHEMES, backends=None, reps=None, model="demo",
        decode_tokens=None, decode=True, log=print) -> dict:
    """The whole benchmark; returns {device, torch, kernels: [rows], decode: [rows]}."""
    dev = torch.device("cpu" if cpu else "cuda")
    shapes = parse_shapes(shapes) if shapes else (CPU_SHAPES if cpu else SHAPES)
    ms = ms or (CPU_MS if cpu else MS)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
    result["kernels"] = run_kernels(dev, shapes, ms, schemes, backends or (["torch"] if cpu else ["triton", "cuda", "torch"]), reps or (3 if cpu else 50), log=log)
    if decode:
        result["decode"] = run_decode(model, dev, decode_tokens or (8 if cpu else 128), backends[0] if backends else None, cpu, log=log)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke run on the CPU: tiny shapes, torch backend, tiny random model")
    p.add_argument("--shapes", nargs="*", default=None, help="KxN shapes (in x out), e.g. 4096x14336")
    p.add_argument("--ms", nargs="*", type=int, default=None, help="numbers of tokens M")
    p.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--backends", nargs="*", default=None, help="torch, triton, cuda (default: triton cuda torch on a GPU)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--model", default="demo", help="model for end-to-end decoding (a folder, .gguf or 'demo')")
    p.add_argument("--decode-tokens", type=int, default=None)
    p.add_argument("--no-decode", action="store_true", help="skip the end-to-end decoding")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("compress.kernels.bench: no CUDA GPU on this machine, nothing to measure; run it on a GPU, "
              "or with --cpu for a smoke run on tiny shapes", file=sys.stderr)
        return 0
    result = run(a.cpu, a.shapes, a.ms, a.schemes, a.backends, a.reps, a.model, a.decode_tokens, not a.no_decode)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
