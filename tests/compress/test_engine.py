"""End-to-end on tiny models of every family: compress, export, reload, compare."""

import json

import pytest
import torch
from conftest import compressed_in_memory, save_tiny

from compress.api import run
from compress.arch.families import find_blocks
from compress.checkpoint.export import Exporter
from compress.checkpoint.load import load
from compress.errors import UsageError
from compress.recipe import load_recipe

FAMILIES = ["llama", "qwen2", "mistral", "gemma3_text", "opt"]


def _recipe(model, out, **gptq):
    opts = {"bits": 4, "group_size": 16, "symmetric": False, "act_order": True, **gptq}
    return load_recipe(
        {
            "model": str(model),
            "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
            "passes": [{"gptq": opts}],
            "eval": {"perplexity": {"seq_len": 64, "max_windows": 3}},
            "export": {"path": str(out)},
        }
    )


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    return request.param, save_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_compress_export_reload_all_families(family_model, tmp_path):
    fam, path = family_model
    rec = _recipe(path, tmp_path / "out")
    report = run(rec)
    out = tmp_path / "out"
    assert (out / "config.json").exists() and (out / "recipe.yaml").exists()
    assert json.loads((out / "report.json").read_text())["schema"] == "compress.report/2"
    # every targeted Linear is reported with a finite, small output error
    assert len(report["layers"]) == 2 * (4 if fam == "opt" else 7) - (0 if fam != "opt" else -4)
    assert all(0 <= l["rel_output_error"] < 0.05 for l in report["layers"])
    ppl = report["eval"]
    assert abs(ppl["model"]["perplexity"] / ppl["baseline"]["perplexity"] - 1) < 0.05

    # reload == in memory, bit for bit (same modules, same math)
    x = torch.randint(0, 300, (2, 24))
    reloaded = load(out, dtype=torch.float32)
    mem = compressed_in_memory(path, rec, tmp_path / "mem")
    with torch.no_grad():
        a = reloaded(input_ids=x).logits
        b = mem(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_transformers_loads_our_export(tmp_path):
    """transformers + compressed-tensors read the export and compute the same logits.

    (compressed-tensors >= 0.19 no longer reads act-order g_idx groups, so act-order is checked
    here in its static-groups form, which needs no g_idx.)"""
    from transformers import AutoModelForCausalLM

    path = save_tiny(tmp_path / "m", "llama")
    for sym, act in ((True, False), (False, True)):
        out = tmp_path / f"out-{sym}-{act}"
        run(_recipe(path, out, symmetric=sym, act_order=act, static_groups=act))
        ours = load(out, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        x = torch.randint(0, 300, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-3, atol=1e-3)


def test_resume_after_interruption_gives_identical_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = save_tiny(tmp_path / "m", "llama")
    full = tmp_path / "full"
    run(_recipe(path, full))

    out = tmp_path / "out"
    real = Exporter.write_block

    def crash_after_first(self, res, inputs):
        real(self, res, inputs)
        if res.index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(Exporter, "write_block", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(path, out))
    assert not out.exists()  # nothing half-written where the result belongs
    assert (tmp_path / ".out.partial" / "progress.json").exists()
    monkeypatch.setattr(Exporter, "write_block", real)
    import compress.engine.sweep

    calls = []
    real_materialize = compress.engine.sweep.materialize

    def recording(module, prefix, *a, **k):
        calls.append(prefix)
        return real_materialize(module, prefix, *a, **k)

    monkeypatch.setattr(compress.engine.sweep, "materialize", recording)
    run(_recipe(path, out), resume=True)
    assert calls == ["model.layers.1."]  # block 0 was not recomputed, nor the capture pass
    for shard in sorted(full.glob("model*.safetensors")):
        a, b = load_file(shard), load_file(out / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_refused_without_overwrite(tmp_path):
    path = save_tiny(tmp_path / "m", "llama")
    (tmp_path / "out").mkdir()
    with pytest.raises(UsageError, match="--overwrite"):
        run(_recipe(path, tmp_path / "out"))


def test_group_size_error_lists_layers_and_sizes(tmp_path):
    path = save_tiny(tmp_path / "m", "llama")
    with pytest.raises(UsageError) as e:
        run(_recipe(path, tmp_path / "out", group_size=48))
    msg = str(e.value)
    assert "group_size 48 does not divide" in msg and "in_features 128 of mlp.down_proj (blocks 0-1 of model.layers)" in msg and "use group_size 64, 32, 16" in msg


def test_ignore_by_regex_leaves_layers_unquantized(tmp_path):
    path = save_tiny(tmp_path / "m", "llama")
    report = run(_recipe(path, tmp_path / "out", ignore=["lm_head", "re:.*down_proj"]))
    names = [l["name"] for l in report["layers"]]
    assert names and not any("down_proj" in n for n in names)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in cfg["ignore"]


def test_unknown_architecture_is_a_clear_error():
    from torch import nn

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.Sequential(nn.Linear(2, 2))

    with pytest.raises(UsageError, match="could not find its decoder blocks"):
        find_blocks(Odd(), "oddformer", 3)


def test_replayed_mlp_input_changes_nothing(tmp_path, monkeypatch):
    """Propagating a block with the MLP replayed from down_proj's kept input
    (calibration.keep_mlp_inputs) gives the very same checkpoint as running the MLP again, and
    the kept inputs are really used."""
    from safetensors.torch import load_file

    import compress.engine.block as engine

    path = save_tiny(tmp_path / "m", "llama")
    reads = []
    real = engine._ReplayInput.forward

    def counting(self, *a, **k):
        reads.append(self.cursor[0])
        return real(self, *a, **k)

    monkeypatch.setattr(engine._ReplayInput, "forward", counting)
    rec = _recipe(path, tmp_path / "kept")
    rec.calibration.keep_mlp_inputs = True
    run(rec)
    assert reads  # the propagation used the kept inputs
    reads.clear()
    run(_recipe(path, tmp_path / "rerun"))  # the default: the MLP runs again
    assert not reads
    for shard in sorted((tmp_path / "kept").glob("model*.safetensors")):
        a, b = load_file(shard), load_file(tmp_path / "rerun" / shard.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
