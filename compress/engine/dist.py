"""Where the engine runs: the device, and the ranks of a data-parallel job.

**Device** (``device`` in the recipe, ``--device``): ``auto`` is the first CUDA device when there
is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` name one. Under ``torchrun`` each rank takes
the GPU of its ``LOCAL_RANK``.

**Ranks** (``torchrun --nproc-per-node N -m compress run recipe.yaml``, or ``compress run
--nproc N``, which execs torchrun): every rank reads the same checkpoint lazily and takes a
disjoint share of the calibration batches. Every statistic a pass collects is a sum or a max over
tokens (``compress.passes.STATS`` declares which), so the engine all-reduces each group's
statistics once, and every rank then holds what one process would have computed on all the
data. The solvers for a group's Linears are spread over the ranks (Linear k on rank k mod N) and
their results gathered, so every rank propagates the same compressed block through its own
batches. Rank 0 alone writes the export, the report and the resume state. ``gloo`` on CPUs,
``nccl`` on GPUs, the same code path; a one-process run is the same code with a ``World`` of one.

Collectives carry a timeout (``COMPRESS_DIST_TIMEOUT`` seconds, default 600): a rank that dies
makes the others fail at their next collective instead of hanging.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from compress.errors import UsageError


def resolve_device(spec: str | None, local_rank: int | None = None) -> torch.device:
    """``auto|cpu|cuda|cuda:N`` -> a torch.device, or UsageError (exit 2) naming what is missing."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec!r}: no CUDA device is available here (torch {torch.__version__} reports "
                f"{'a CPU-only build' if torch.version.cuda is None else 'no visible GPU'}); use `--device cpu` or `auto`"
            )
        if spec == "cuda":
            return torch.device("cuda", local_rank or 0)
        try:
            idx = int(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"device {spec!r}: expected cuda:N with N a number") from None
        if not 0 <= idx < torch.cuda.device_count():
            raise UsageError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..)")
        return torch.device("cuda", idx)
    raise UsageError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


# how each statistic's fields combine across ranks (fields not listed are summed)
MAX_FIELDS = {"max"}


@dataclass
class World:
    """This process's place in the job: rank, world size, and the device it computes on."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # gloo | nccl when size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> list[int]:
        """Which of ``n`` items (calibration batches) this rank takes: a contiguous slice, the
        first ranks one more when ``n`` does not divide (every rank gets at least one)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (self.rank < extra)))

    def owner(self, k: int) -> int:
        """The rank that solves the ``k``-th Linear of a group."""
        return k % self.size

    # ------------------------------------------------------------ collectives

    def reduce_stats(self, stats: dict[str, dict]) -> None:
        """All-reduce every statistic in ``stats`` ({name: {stat: {field: tensor or count}}}) in
        place: sums for sums, max for ``max`` fields; one flat collective per kind (tensors,
        counts), not one per tensor. Every rank must call it with the same names and fields."""
        if not self.distributed:
            return

        fields = [(st, f) for n in sorted(stats) for s in sorted(stats[n]) for st in [stats[n][s]] for f in sorted(st)]
        for op, is_max in ((dist.ReduceOp.SUM, False), (dist.ReduceOp.MAX, True)):
            tensors = [(st, f) for st, f in fields if isinstance(st[f], torch.Tensor) and (f in MAX_FIELDS) == is_max]
            if tensors:
                flat = torch.cat([st[f].reshape(-1).float() for st, f in tensors])
                dist.all_reduce(flat, op=op)
                pos = 0
                for st, f in tensors:
                    k = st[f].numel()
                    st[f].copy_(flat[pos : pos + k].reshape(st[f].shape))
                    pos += k
        counts = [(st, f) for st, f in fields if isinstance(st[f], int) and not isinstance(st[f], bool)]
        if counts:  # token counts: exact integers
            flat = torch.tensor([st[f] for st, f in counts], dtype=torch.int64, device=self.device)
            dist.all_reduce(flat)
            for (st, f), v in zip(counts, flat.tolist()):
                st[f] = int(v)

    def sum(self, value: float) -> float:
        """A float summed over the ranks (losses of a search each rank evaluates on its batches)."""
        if not self.distributed:
            return value

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0])

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable; tensors should be on the CPU), in rank order."""
        if not self.distributed:
            return [obj]

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]

        out = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def timeout_s() -> float:
    return float(os.environ.get("COMPRESS_DIST_TIMEOUT", "600"))


def init_world(device: str | None = "auto") -> World:
    """The World of this process: one process, or a rank of a torchrun job (``WORLD_SIZE`` > 1 in
    the environment), its process group initialized (gloo on the CPU, nccl on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=resolve_device(device))

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank=local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return World(rank=rank, size=size, device=dev, backend=backend)


def close_world(world: World) -> None:
    if world.distributed:

        if dist.is_initialized():
            dist.destroy_process_group()


def moved(obj, device: torch.device | str):
    """``obj`` (tensors, modules, dataclasses, dicts, lists, tuples, nested) with every tensor on
    ``device``. A module is copied when it must move: the original stays where it computes."""
    device = torch.device(device)
    if isinstance(obj, torch.nn.Module):
        there = all(t.device == device for t in [*obj.parameters(), *obj.buffers()])
        return obj if there else copy.deepcopy(obj).to(device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(v, device) for v in obj)
    return obj


def to_cpu(obj):
    """``obj`` with every tensor on the CPU, for pickling between ranks."""
    return moved(obj, "cpu")
