"""Text the model writes itself: data-free calibration (LLM-QAT, Liu et al. 2023) and the
samples of on-policy distillation (GKD, Agarwal et al. 2024).

``sample`` continues token prompts with a causal LM through its KV cache: each new token drawn
from the softmax of the last logits at ``temperature`` over the ``top_k`` most likely tokens
(temperature 0: greedy), or greedy once ``greedy_after`` tokens are written. It is deterministic
for a seed on a given machine (one ``torch.Generator`` draws every token).

``generated_windows`` is the recipe's ``calibration.data: generated``: ``samples`` sequences of
``seq_len`` tokens, each begun with a token drawn uniformly from the vocabulary's ordinary tokens
(special tokens and padding rows excluded), as LLM-QAT does, then sampled from the model. The
result is cached on disk (``$COMPRESS_CACHE/generated``) under a key of the model's files, the
count, the length, the sampling options and the seed, so a second run, or another pass or
distillation on the same model, reads it back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.data import calibration_set
from compress.errors import UsageError
from compress.utils import DiskError, atomic_write

GENERATED = "generated"  # calibration.data's value for text the model writes itself


def _no_progress(done: int, total: int) -> None:
    pass


@torch.no_grad()
def sample(model: nn.Module, prompts: torch.Tensor, new_tokens: int, *, temperature: float = 1.0, top_k: int | None = 50,
           greedy_after: int | None = None, greedy_first: int = 0, generator: torch.Generator | None = None,
           allowed: torch.Tensor | None = None, step: Callable[[], None] | None = None) -> torch.Tensor:
    """``prompts`` (B, P) continued by ``new_tokens`` tokens -> (B, P + new_tokens) int64.

    ``greedy_after``: tokens written (counting the prompt) after which the choice is the most
    likely token; ``greedy_first``: tokens (counting the prompt) up to which it is (LLM-QAT's
    hybrid: the first few tokens top-1, then sampled); ``allowed``: a boolean mask over the vocabulary (False: never drawn);
    ``step``: called after each new token (a progress bar)."""
    if new_tokens <= 0:
        return prompts.clone()
    dev = next(model.parameters()).device
    ids = prompts.to(dev)
    out = model(input_ids=ids, use_cache=True)
    written = []
    for t in range(new_tokens):
        logits = out.logits[:, -1].float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed[: logits.shape[-1]].to(dev), float("-inf"))
        pos = prompts.shape[1] + t  # the index of the token being chosen
        greedy = temperature == 0 or pos < greedy_first or (greedy_after is not None and pos >= greedy_after)
        nxt = logits.argmax(-1) if greedy else _draw(logits, temperature, top_k, generator)
        written.append(nxt)
        if step is not None:
            step()
        if t + 1 < new_tokens:
            out = model(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
    return torch.cat([ids, torch.stack(written, 1)], 1).cpu()


def _draw(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the top_k."""
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, -1).cpu()
    return torch.multinomial(p, 1, generator=generator)[:, 0].to(logits.device)


def ordinary_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """A boolean mask over the model's ``vocab_size`` rows: True for the tokenizer's ordinary
    tokens (not special, not an embedding row past the tokenizer's vocabulary)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[: min(len(tokenizer), vocab_size)] = True
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    mask[special] = False
    return mask


def generate_sequences(model: nn.Module, tokenizer, count: int, length: int, *, seed: int, temperature: float = 1.0,
                       top_k: int | None = 50, greedy_after: int | None = None, greedy_first: int = 0, batch_size: int = 16,
                       progress: Callable[[int, int], None] = _no_progress) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens the model writes from a uniformly drawn first
    token -> (count, length) int64. Special tokens may follow (an end of text starts a new
    document, as in a corpus); only the first token is restricted to ordinary ones."""
    if count < 1 or length < 2:
        raise UsageError(f"generated data: {count} sequences of {length} tokens; use at least 1 sequence of 2 tokens")
    vocab = model.config.vocab_size  # (a quantized head stores no .weight)
    firsts = ordinary_tokens(tokenizer, vocab).nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    out, done, total = [], 0, count * (length - 1)

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if done % (8 * k) == 0 or done == total:
            progress(done, total)

    for b in range(0, count, batch_size):
        n = min(batch_size, count - b)
        first = firsts[torch.randint(len(firsts), (n, 1), generator=g)]
        out.append(sample(model, first, length - 1, temperature=temperature, top_k=top_k, greedy_after=greedy_after,
                          greedy_first=greedy_first, generator=g, step=lambda n=n: tick(n)))
    return torch.cat(out)


def calibration_of(cal, source, seed: int, hooks=None) -> torch.Tensor:
    """A recipe's calibration windows for the model at ``source`` (a ModelSource): the text of
    ``cal.data`` (``compress.data.calibration_set``), or with ``data: generated`` the sequences
    the model writes itself (``hooks`` gets the log and the progress)."""
    if cal.data != GENERATED:
        return calibration_set(cal, source.tokenizer, seed)
    log = getattr(hooks, "log", print)
    progress = (lambda d, n: hooks.progress("generate", d, n)) if hooks is not None else _no_progress
    return generated_windows(source, cal, seed, log=log, progress=progress)


def model_key(path: Path) -> str:
    """A key of a checkpoint's files: config.json's content and each weight file's name, size
    and modification time (a re-exported or retrained model gets another key)."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.gguf")):
        s = f.stat()
        h.update(f"{f.name}:{s.st_size}:{s.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def generated_windows(source, cal, seed: int, log: Callable[[str], None] = print,
                      progress: Callable[[int, int], None] = _no_progress) -> torch.Tensor:
    """``calibration.data: generated``: ``cal.samples`` sequences of ``cal.seq_len`` tokens
    written by the model at ``source`` (a ModelSource) with ``cal.generate``'s sampling options
    and ``seed``, read from the cache where an earlier run wrote them."""
    from compress.checkpoint.load import load_source
    from compress.checkpoint.source import cache_dir

    gen = cal.generate
    # (greedy_first at its default stays out of the key: caches written before it existed stay valid)
    settings = {"model": model_key(source.path), "count": cal.samples, "length": cal.seq_len, "seed": seed,
                **gen.model_dump(mode="json", exclude={"greedy_first"} if not gen.greedy_first else None)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    cache = cache_dir() / GENERATED / f"{key}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=False)
        if saved.get("settings") == settings:
            log(f"generated calibration data: {cal.samples} sequences of {cal.seq_len} tokens from the cache ({cache})")
            return saved["ids"]
    log(f"generating {cal.samples} calibration sequences of {cal.seq_len} tokens with {source.path.name} "
        f"(temperature {gen.temperature}, top-k {gen.top_k}, seed {seed})")
    t0 = time.time()
    model = load_source(source)
    ids = generate_sequences(model, source.tokenizer, cal.samples, cal.seq_len, seed=seed, temperature=gen.temperature,
                             top_k=gen.top_k, greedy_after=gen.greedy_after, greedy_first=gen.greedy_first, batch_size=gen.batch_size,
                             progress=progress)
    del model
    log(f"generated {ids.numel():,} tokens in {time.time() - t0:.0f} s")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save({"settings": settings, "ids": ids}, tmp))
    except (OSError, DiskError) as e:  # a cache, not an output: a full or read-only cache costs the next run the time only
        log(f"generated calibration data not cached ({e})")
    return ids
