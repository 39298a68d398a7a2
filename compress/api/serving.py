"""Serve a (compressed) checkpoint: greedy decoding through HF ``generate()`` with a chosen kernel."""

from __future__ import annotations

import time

import torch

from compress.checkpoint.load import load
from compress.errors import UsageError
from compress.modules import compressed_modules
from compress.quant.kv_cache import new_cache

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def generate(model_ref, prompt: str, max_new_tokens: int = 32, kernel: str | None = None, dtype: str | None = None,
             device: str | None = None, log=print) -> dict:
    """Load ``model_ref`` (compressed layers stay packed), decode greedily after ``prompt``.

    dtype: the compute dtype (default bf16 on a GPU; on the CPU the checkpoint's stored dtype,
    bf16 for our exports, where the CPU has native bf16, so packed layers run the CPU integer
    kernels; see ``compress.load``); device: 'cpu', 'cuda', ... (default: cuda when available). Returns the text, the token
    counts, tokens/s of the decode and the kernel each quantized layer ran.
    """
    # lazily: the kernels package imports no checkpoint loader (formats imports the kernels)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    dt = DTYPES[dtype] if dtype else (torch.bfloat16 if dev.type == "cuda" else "auto")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model = load(model_ref, dtype=dt, log=log, kernel=kernel, device=dev)
    dt = next(model.parameters()).dtype
    tok = model.compress_source.tokenizer
    ids = tok(prompt, return_tensors="pt").input_ids.to(dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id if tok.eos_token_id is not None else 0)
    with torch.no_grad():
        cache = new_cache(model)  # KV8/KV4 exports: a cache of integer codes (None: transformers' own)
        extra = {"past_key_values": cache} if cache is not None else {}
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt_s = time.perf_counter() - t
    new = out[0, ids.shape[1]:]
    kernels = {}
    for _, m in compressed_modules(model):
        if m.kernel is not None:  # a type with kernels (packed, int8)
            kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
    sparse = getattr(model, "compress_sparse24", None)
    if sparse and sparse["converted"]:
        kernels["sparse24"] = len(sparse["converted"])  # 2:4 semi-structured dense Linears
    return {
        "model": str(model_ref), "prompt": prompt, "text": tok.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]), "new_tokens": int(new.numel()), "seconds": dt_s,
        "tokens_per_s": new.numel() / dt_s if dt_s > 0 else None, "device": str(dev), "dtype": str(dt).removeprefix("torch."),
        "kernels": kernels,  # backend -> number of layers that ran it last (sparse24: semi-structured 2:4 Linears)
    }
