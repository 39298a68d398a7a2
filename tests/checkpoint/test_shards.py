"""Shards by size (export.max_shard_size, --max-shard-size), as transformers writes them: one
model.safetensors when the export fits, else model-0000k-of-0000N.safetensors of at most the limit
each (a larger tensor alone) with an index; still written block by block, resumable, and the same
tensors whatever the limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import gptq_w4_recipe, save_tiny
from safetensors import safe_open
from typer.testing import CliRunner

import compress.checkpoint.export as export_mod
from compress.api import run
from compress.checkpoint.export import read_header, write_shard
from compress.checkpoint.load import load
from compress.cli import app
from compress.errors import UsageError
from compress.recipe import load_recipe, size_bytes

LIMIT = 8_000  # bytes: a few shards per block of the tiny llama's W4 export, and the embedding (41 kB) alone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("shards") / "m", "llama")


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _data_bytes(f: Path) -> dict[str, int]:
    return {k: e - b for k, (b, e) in ((k, v["data_offsets"]) for k, v in read_header(f)[1].items())}


@pytest.fixture(scope="module")
def one(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    run(gptq_w4_recipe(tiny, out))
    return out


@pytest.fixture(scope="module")
def many(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "out"
    run(gptq_w4_recipe(tiny, out, max_shard_size=LIMIT))
    return out


def test_one_file_when_the_export_fits(one):
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()  # as transformers writes one shard
    assert not list(one.glob("block-*")) and not list(one.glob("shard-*"))


def test_shards_respect_the_limit_and_hold_the_same_tensors(one, many):
    shards = sorted(many.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and [p.name for p in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    sizes = {}
    for f in shards:
        sizes.update(_data_bytes(f))
        shard = _data_bytes(f)
        # at most the limit, unless one tensor alone is larger (as transformers)
        assert sum(shard.values()) <= LIMIT or len(shard) == 1
        assert all(index["weight_map"][k] == f.name for k in shard)
    assert set(index["weight_map"]) == set(sizes)
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # every shard was cut where the next tensor would have passed the limit
    a, b = _tensors(one), _tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in shards:  # tensors start at a multiple of their element size (safetensors' own layout)
        for k, v in read_header(f)[1].items():
            assert v["data_offsets"][0] % b[k].element_size() == 0


def test_the_reloaded_model_is_the_same_and_transformers_loads_the_shards(one, many):
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ours_one = load(one, dtype=torch.float32, log=lambda *_: None)(input_ids=x).logits
        ours_many = load(many, dtype=torch.float32, log=lambda *_: None)(input_ids=x).logits
        hf, info = AutoModelForCausalLM.from_pretrained(many, dtype=torch.float32, output_loading_info=True)
        theirs = hf(input_ids=x).logits
    assert torch.equal(ours_one, ours_many)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(theirs, ours_many, rtol=1e-4, atol=1e-4)


def test_a_run_interrupted_after_a_shard_resumes_into_the_same_export(tiny, many, tmp_path, monkeypatch):
    target = tmp_path / "out"
    real = export_mod.Exporter.write_block

    def stop_after_first(self, res, inputs):
        real(self, res, inputs)
        if res.index == 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(export_mod.Exporter, "write_block", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            run(gptq_w4_recipe(tiny, target, max_shard_size=LIMIT))
    work = tmp_path / ".out.partial"
    progress = json.loads((work / "progress.json").read_text())
    assert progress["done"] == 1 and progress["shards"]  # block 0 filled a shard already
    assert not (work / "block-00001.safetensors").exists() or progress["pending"]
    with pytest.raises(UsageError, match="max_shard_size"):  # other shards than the interrupted run's
        run(gptq_w4_recipe(tiny, target, max_shard_size=2 * LIMIT), resume=True)
    run(gptq_w4_recipe(tiny, target, max_shard_size=LIMIT), resume=True)
    assert sorted(p.name for p in target.glob("*.safetensors")) == sorted(p.name for p in many.glob("*.safetensors"))
    a, b = _tensors(target), _tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (target / "model.safetensors.index.json").read_text() == (many / "model.safetensors.index.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_shard_write_leaves_no_half_file_and_resumes(tiny, many, tmp_path, monkeypatch):
    target = tmp_path / "out"
    calls = []
    real = export_mod.write_shard

    def full_disk(path, entries):
        calls.append(path.name)
        if len(calls) == 2:
            def write(tmp):
                tmp.write_bytes(b"half")
                raise OSError(28, "No space left on device", str(tmp))
            export_mod.atomic_write(path, write)
        return real(path, entries)

    with monkeypatch.context() as m:
        m.setattr(export_mod, "write_shard", full_disk)
        with pytest.raises(Exception) as e:
            run(gptq_w4_recipe(tiny, target, max_shard_size=LIMIT))
    assert getattr(e.value, "exit_code", None) == 3 and "--resume" in str(e.value)
    work = tmp_path / ".out.partial"
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]
    run(gptq_w4_recipe(tiny, target, max_shard_size=LIMIT), resume=True)
    a, b = _tensors(target), _tensors(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_write_shard_copies_bytes_exactly(tmp_path):
    from safetensors.torch import load_file, save_file

    a = {"x.w": torch.randn(3, 5).to(torch.bfloat16), "x.q": torch.randint(0, 9, (7,), dtype=torch.int32)}
    b = {"y.s": torch.tensor([2, 3], dtype=torch.int64), "y.b": torch.ones(3, dtype=torch.int8), "y.e": torch.zeros(0)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    entries = [(k, tmp_path / "a.safetensors") for k in a] + [(k, tmp_path / "b.safetensors") for k in b]
    write_shard(tmp_path / "s.safetensors", entries)
    got = load_file(tmp_path / "s.safetensors")
    assert got.keys() == {**a, **b}.keys() and all(torch.equal(got[k], v) for k, v in {**a, **b}.items())
    assert read_header(tmp_path / "s.safetensors")[0] % 8 == 0  # the data starts 8-byte aligned


@pytest.mark.parametrize("text, n", [("4GB", 4 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5GB", 15 * 10**8),
                                     (1000, 1000), ("123", 123)])
def test_sizes(text, n):
    assert size_bytes(text) == n


@pytest.mark.parametrize("bad", ["lots", "0", -5, "4 parsecs", ""])
def test_a_bad_size_is_exit_2_naming_the_field(bad):
    with pytest.raises(UsageError, match="export.max_shard_size"):
        load_recipe({"export": {"max_shard_size": bad}})


def test_cli_option(tiny, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny), "-o", str(tmp_path / "o"), "--max-shard-size", "40kB", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["export"]["max_shard_size"] == "40kB"
    r = CliRunner().invoke(app, ["run", "--max-shard-size", "lots", "--dry-run"])
    assert r.exit_code == 2 and "export.max_shard_size" in r.output
