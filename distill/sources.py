"""What model-scope distillation trains on, one micro-batch at a time (``compress.distill.loop``).

* ``Windows``: token windows in memory (the calibration windows), a permutation seeded by
  (seed, epoch) per epoch;
* ``Responses``: black-box examples (``compress.distill.blackbox.Examples``): prompt and
  response tokens, the loss on the response tokens only; the same seeded order, each batch cut to
  its longest example;
* ``Streamed``: windows read from a corpus file as training goes (``compress.distill.stream``),
  in file order, epoch after epoch, never all in memory.

Each gives ``Batch``es by micro-batch number ``m`` (counted over all epochs), so a resumed run
asks for batch ``m`` and gets what the uninterrupted run got.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    x: torch.Tensor  # (B, L) token ids
    # (B, L) bool over the logits' positions: True where the loss counts (position t predicts
    # token t + 1); None: every position
    mask: torch.Tensor | None = None
    idx: torch.Tensor | None = None  # the windows' indices (Windows: where a cached top-k is looked up)


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Windows:
    """In-memory windows (N, L); each epoch a seeded permutation, cut into batches."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = -(-len(windows) // batch_size)  # micro-batches per epoch
        self.seq_len = self.tokens_per_item = windows.shape[1]

    def __len__(self) -> int:
        return len(self.windows)

    def indices(self, m: int) -> torch.Tensor:
        epoch, j = divmod(m, self.per_epoch)
        return _order(len(self.windows), self.seed, epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def batch(self, m: int) -> Batch:
        idx = self.indices(m)
        return Batch(self.windows[idx], None, idx)

    def digest(self, h) -> None:
        h.update(self.windows.numpy().tobytes())


def response_mask(targets: torch.Tensor) -> torch.Tensor:
    """A mask of target tokens (True: token t is learned) as a mask over logit positions (True:
    position t's prediction of token t + 1 counts)."""
    out = torch.zeros_like(targets)
    out[:, :-1] = targets[:, 1:]
    return out


class Responses:
    """Black-box examples: ``ids``/``mask``/``lengths`` as ``Examples`` holds them (mask: the
    response tokens); batches in a seeded order per epoch, trimmed to their longest example."""

    def __init__(self, examples, batch_size: int, seed: int = 0):
        self.ex, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = -(-len(examples.ids) // batch_size)
        self.seq_len = examples.ids.shape[1]
        self.tokens_per_item = float(examples.lengths.float().mean())

    def __len__(self) -> int:
        return len(self.ex.ids)

    def batch(self, m: int) -> Batch:
        epoch, j = divmod(m, self.per_epoch)
        idx = _order(len(self.ex.ids), self.seed, epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        return self.take(idx)

    def take(self, idx: torch.Tensor) -> Batch:
        n = int(self.ex.lengths[idx].max())
        return Batch(self.ex.ids[idx, :n], response_mask(self.ex.mask[idx, :n]), idx)

    def all_batches(self, batch_size: int):
        """Every example once, in order (the held-out evaluation)."""
        for b in range(0, len(self), batch_size):
            yield self.take(torch.arange(b, min(b + batch_size, len(self))))

    def digest(self, h) -> None:
        for t in (self.ex.ids, self.ex.mask, self.ex.lengths):
            h.update(t.numpy().tobytes())


class Streamed:
    """Windows of a ``TokenStream`` read as training goes: batch ``m`` is the m-th of its
    endless ``batches``. Batches asked for ahead (the on-policy prompts) are kept until their
    turn; asking for an earlier one restarts the reading there, which is how a resumed run
    continues."""

    def __init__(self, stream, batch_size: int, seed: int = 0):
        self.stream, self.batch_size, self.seed = stream, batch_size, seed
        self.per_epoch = None  # unknown until the file has been read once
        self.seq_len = self.tokens_per_item = stream.seq_len
        self._it, self._next, self._ahead = None, 0, {}

    def batch(self, m: int) -> Batch:
        if m in self._ahead:
            return Batch(self._ahead.pop(m))
        if self._it is None or m < self._next:
            self._it, self._next, self._ahead = self.stream.batches(self.batch_size, start=m, seed=self.seed), m, {}
        while self._next < m:
            self._ahead[self._next] = next(self._it)
            self._next += 1
        self._next = m + 1
        return Batch(next(self._it))

    def digest(self, h) -> None:
        h.update(f"{self.stream.path}:{self.stream.seq_len}".encode())


def digest(*sources, extra: bytes = b"") -> str:
    h = hashlib.sha256(extra)
    for s in sources:
        s.digest(h)
    return h.hexdigest()[:16]
