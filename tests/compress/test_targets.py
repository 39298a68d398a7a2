"""--target / export.target: a scheme the runtime cannot load is exit 2 before any work, naming
what works instead; every export records (and `compress inspect` shows) the runtimes that load it.
The rules are the module types' (CompressedLinear.refusal), verified against the runtimes by
tests/vllm (vLLM-CPU) and tests/checkpoint/test_transformers_load.py (transformers)."""

import json

import pytest
from conftest import save_tiny
from typer.testing import CliRunner

from compress.checkpoint.formats import Int8Linear, QuantLinear
from compress.cli import app
from compress.modules import (
    ALL_RUNTIMES,
    COMPRESS,
    TARGETS,
    TRANSFORMERS,
    VLLM,
    VLLM_CPU,
    has_experts,
)

runner = CliRunner()


def _spec(bits=4, symmetric=True, act_order=False, group_size=64):
    return {"bits": bits, "group_size": group_size, "symmetric": symmetric, "act_order": act_order}


def test_the_rules():
    assert QuantLinear.runtimes(_spec()) == list(ALL_RUNTIMES)
    assert QuantLinear.runtimes(_spec(symmetric=False)) == [VLLM, TRANSFORMERS, COMPRESS]
    assert "symmetric: true" in QuantLinear.refusal(_spec(symmetric=False), VLLM_CPU)
    assert QuantLinear.runtimes(_spec(bits=3)) == [TRANSFORMERS, COMPRESS]
    assert "bits 4 or 8" in QuantLinear.refusal(_spec(bits=3), VLLM)
    assert "W8A8" in QuantLinear.refusal(_spec(bits=8), VLLM_CPU)  # no 8-bit weight-only kernel there
    assert "static_groups" in QuantLinear.refusal(_spec(act_order=True), TRANSFORMERS)
    assert "group size" in QuantLinear.refusal(_spec(group_size=-1), VLLM_CPU)
    assert QuantLinear.runtimes(_spec(act_order=True)) == [COMPRESS]  # g_idx: vLLM and transformers refuse it
    assert Int8Linear.runtimes({"bits": 8, "group_size": -1, "symmetric": True}) == list(ALL_RUNTIMES)
    assert set(TARGETS.values()) == set(ALL_RUNTIMES)
    # vLLM-CPU 0.32 has no W4A16 MoE kernel ("No WNA16 MoE backend supports the deployment configuration.")
    assert QuantLinear.runtimes({**_spec(), "moe": True}) == [VLLM, TRANSFORMERS, COMPRESS]
    assert "MoE experts" in QuantLinear.refusal({**_spec(), "moe": True}, VLLM_CPU)


def test_moe_configs_are_told_apart():
    assert has_experts({"num_experts": 32}) and has_experts({"num_local_experts": 8}) and has_experts({"n_routed_experts": 64})
    assert not has_experts({"num_experts": 0}) and not has_experts({"hidden_size": 64})
    assert has_experts(type("C", (), {"num_local_experts": 4})()) and not has_experts(type("C", (), {})())


def test_w4a16_moe_for_vllm_cpu_is_exit_2_before_any_work(tmp_path):
    moe = save_tiny(tmp_path / "moe", "qwen3_moe")
    out = tmp_path / "out"
    r = runner.invoke(app, ["quantize", str(moe), "-o", str(out), "--method", "rtn", "--group-size", "16", "--no-eval", "--target", "vllm-cpu"])
    assert r.exit_code == 2 and "MoE experts" in r.output and "--target compress" in r.output, r.output
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("targets") / "llama", "llama")


def _run(tiny, out, *extra):
    return runner.invoke(app, ["quantize", str(tiny), "-o", str(out), "--group-size", "16", "--samples", "4", "--seq-len", "32",
                               "--no-eval", "--json", *extra])


@pytest.mark.parametrize("extra,target,says", [
    (["--method", "rtn", "--asym"], "vllm-cpu", "use symmetric: true"),
    (["--method", "rtn", "--bits", "3"], "vllm", "use bits 4 or 8"),
    (["--method", "rtn", "--bits", "8"], "vllm-cpu", "W8A8"),
    (["--method", "gptq", "--set", "passes.0.gptq.static_groups=false"], "transformers", "static_groups"),
])
def test_a_scheme_the_target_cannot_load_is_exit_2_before_any_work(tiny, tmp_path, extra, target, says):
    out = tmp_path / "out"
    r = _run(tiny, out, *extra, "--target", target)
    assert r.exit_code == 2, r.output
    assert f"export.target is {target}" in r.output and says in r.output
    assert not out.exists()


def test_factored_lowrank_with_a_target_other_than_compress_is_exit_2(tiny, tmp_path):
    r = runner.invoke(app, ["lowrank", str(tiny), "-o", str(tmp_path / "lr"), "--reduction", "0.2", "--samples", "4", "--seq-len", "32",
                            "--no-eval", "--target", "vllm"])
    assert r.exit_code == 2 and "factored low-rank" in r.output and "merged" in r.output, r.output


def test_every_export_records_the_runtimes_that_load_it(tiny, tmp_path):
    out = tmp_path / "asym"
    r = _run(tiny, out, "--method", "rtn", "--asym", "--target", "vllm")
    assert r.exit_code == 0, r.output
    rt = json.loads((out / "report.json").read_text())["runtimes"]
    assert rt["loads"] == [VLLM, TRANSFORMERS, COMPRESS] and "symmetric" in rt["refuses"][VLLM_CPU]["why"]
    assert json.loads((out / "compress.json").read_text())["runtimes"] == rt
    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["runtimes"] == rt
    text = runner.invoke(app, ["inspect", str(out)])
    assert "loads in: vLLM, transformers, compress" in text.output and "not vLLM-CPU" in text.output
