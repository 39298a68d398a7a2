"""Data-parallel calibration (compress.engine.dist) on the CPU with gloo, and the device option.

Ranks are forked processes with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
or torchrun itself through `compress run --nproc 2`."""

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file

from compress.api import run
from compress.engine.dist import World
from compress.errors import UsageError
from compress.passes import STATS
from compress.recipe import load_recipe


def _recipe(model, out, passes=None, samples=16, batch_size=2):
    return load_recipe({
        "model": str(model),
        "calibration": {"samples": samples, "seq_len": 64, "batch_size": batch_size},
        "passes": passes or [{"gptq": {"bits": 4, "group_size": 16, "act_order": True}}],
        "eval": {"perplexity": None},
        "export": {"path": str(out)},
    })


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, n, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n))
    try:
        fn(rank, *args)
    except BaseException as e:  # the error's exit code, as the CLI would exit; the message helps whoever debugs
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        os._exit(getattr(e, "exit_code", 1))
    os._exit(0)


def _spawn(n: int, fn, *args, timeout: float = 240) -> list[int]:
    """Run ``fn(rank, *args)`` in ``n`` fresh processes forming one gloo job (spawned, not forked:
    a fork of a process whose OpenMP pool is running can hang); their exit codes."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, n, port, fn, args)) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


def _tensors(folder) -> dict:
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _run_rank(rank, recipe_dict):
    run(load_recipe(recipe_dict))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("dist") / "m", "llama")


@pytest.mark.parametrize("passes", [
    [{"gptq": {"bits": 4, "group_size": 16, "act_order": True}}],
    [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 16}}],
    [{"awq": {"bits": 4, "group_size": 16}}],
], ids=["gptq", "sparsegpt+gptq", "awq"])
def test_two_ranks_give_the_one_process_export(tiny, tmp_path, passes):
    """2 gloo ranks, each on half of the calibration batches (4 of 8), write the same checkpoint
    as one process on all of them: statistics are sums (all-reduced), every rank solves its share
    of the Linears and gets the others'. XᵀX summed in another order differs in the last bits
    (the reports' errors by ~1e-7); on this model no rounding decision flips, so the codes,
    scales and norms are equal bit for bit. (On the demo model they do flip: BENCHMARKS.md.)"""
    run(_recipe(tiny, tmp_path / "one", passes))
    two = _recipe(tiny, tmp_path / "two", passes).model_dump()
    assert _spawn(2, _run_rank, two) == [0, 0]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["run"] == {"device": "cpu", "world_size": 2, "backend": "gloo", "activations": "device"}
    assert json.loads((tmp_path / "one" / "report.json").read_text())["run"] == {"device": "cpu", "world_size": 1, "activations": "device"}


def _reduce_rank(rank, xs, out):
    from compress.engine.dist import init_world

    world = init_world("cpu")
    stats = {"lin": {s: STATS[s][0](xs[0].shape[-1]) for s in STATS if s != "xcov"}}
    for x in xs[rank::2]:
        for s, st in stats["lin"].items():
            STATS[s][1](st, x)
    world.reduce_stats(stats)
    if rank == 0:
        torch.save(stats, out)
    torch.distributed.destroy_process_group()


def test_every_statistic_reduces_to_the_one_process_value(tmp_path):
    """Sums (XᵀX, Σ|x|, Σx², token counts) add up and max|x| takes the max across ranks."""
    torch.manual_seed(0)
    xs = [torch.randn(3, 5, 6) * (i + 1) for i in range(4)]
    assert _spawn(2, _reduce_rank, xs, tmp_path / "s.pt") == [0, 0]
    got = torch.load(tmp_path / "s.pt")["lin"]
    for s in got:
        ref = STATS[s][0](6)
        for x in xs:
            STATS[s][1](ref, x)
        for k, v in ref.items():
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(got[s][k], v, rtol=1e-6, atol=1e-5)
            else:
                assert got[s][k] == v, (s, k)


def _die_rank(rank, recipe_dict):
    if rank == 1:  # rank 1 dies after its first block, mid-run
        import compress.engine.sweep as eng

        real = eng.trim_heap
        calls = [0]

        def trim():
            calls[0] += 1
            if calls[0] == 1:
                os._exit(17)
            real()

        eng.trim_heap = trim
    run(load_recipe(recipe_dict))


def test_a_dead_rank_ends_the_job_on_every_rank(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_DIST_TIMEOUT", "30")
    t0 = time.time()
    codes = _spawn(2, _die_rank, _recipe(tiny, tmp_path / "out").model_dump(), timeout=120)
    assert codes == [6, 17], codes  # rank 0 ended with JobError (exit 6), it did not hang
    assert time.time() - t0 < 90
    assert not (tmp_path / "out").exists()  # nothing half-written where the export belongs


def _stop_rank(rank, recipe_dict):
    import compress.engine.sweep as eng

    real = eng.trim_heap

    def trim():  # both ranks are stopped after block 0, as by Ctrl-C
        real()
        raise KeyboardInterrupt

    eng.trim_heap = trim
    try:
        run(load_recipe(recipe_dict))
    except KeyboardInterrupt:
        pass


def _resume_rank(rank, recipe_dict):
    run(load_recipe(recipe_dict), resume=True)


@pytest.mark.parametrize("ranks", [1, 2])
def test_resume_with_any_number_of_ranks(tiny, tmp_path, ranks):
    """A 2-rank run interrupted after block 0 resumes from rank 0's state, in one process or
    on 2 ranks again (the state is shared out to them), and writes the checkpoint an
    uninterrupted run writes."""
    run(_recipe(tiny, tmp_path / "full"))
    rec = _recipe(tiny, tmp_path / "out")
    assert _spawn(2, _stop_rank, rec.model_dump()) == [0, 0]
    progress = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
    assert progress["done"] == 1
    if ranks == 1:
        run(rec, resume=True)
    else:
        assert _spawn(2, _resume_rank, rec.model_dump()) == [0, 0]
    a, b = _tensors(tmp_path / "full"), _tensors(tmp_path / "out")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_nproc_execs_torchrun(tiny, tmp_path):
    """`compress run --nproc 2` is torchrun with 2 ranks: same export, the summary says so."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny}\ncalibration: {{samples: 8, seq_len: 64, batch_size: 2}}\n"
                      "passes:\n  - gptq: {bits: 4, group_size: 16}\neval: {perplexity: null}\n")
    r = subprocess.run([sys.executable, "-m", "compress", "run", str(recipe), "-o", str(tmp_path / "two"), "--nproc", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "× 2 ranks (gloo)" in r.stdout
    assert json.loads((tmp_path / "two" / "report.json").read_text())["run"]["world_size"] == 2


def test_calibration_smaller_than_the_ranks_is_a_usage_error(tiny, tmp_path):
    codes = _spawn(2, _run_rank, _recipe(tiny, tmp_path / "out", samples=2, batch_size=2).model_dump())
    assert codes == [2, 2]


def test_world_shares_batches_disjointly():
    for n, size in ((8, 2), (7, 3), (3, 3)):
        shares = [World(rank=r, size=size).share(n) for r in range(size)]
        assert sorted(b for s in shares for b in s) == list(range(n)) and all(shares)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_device_cuda_without_cuda_exits_2(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "compress", "quantize", str(tiny), "-o", str(tmp_path / "out"), "--device", "cuda",
                        "--no-eval"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "device 'cuda': no CUDA device is available" in r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="expected auto, cpu, cuda or cuda:N"):
        run(load_recipe({**_recipe(tiny, tmp_path / "o").model_dump(), "device": "tpu"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_sweep_matches_the_cpu_one(tiny, tmp_path):
    """The engine on a GPU (blocks, activations, statistics and solvers there) writes the
    checkpoint the CPU writes, up to float differences: equal codes on almost every weight."""
    run(_recipe(tiny, tmp_path / "cpu"))
    rec = _recipe(tiny, tmp_path / "gpu").model_dump()
    report = run(load_recipe({**rec, "device": "cuda"}))
    assert report["run"]["device"].startswith("cuda")
    a, b = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "gpu")
    for k in a:
        if k.endswith("weight_packed"):
            assert (a[k] == b[k]).float().mean() > 0.99, k
