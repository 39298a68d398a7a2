"""Mixed precision: the allocation never exceeds the bits budget, beats every uniform width that
fits it, cannot afford one more step; the run exports one config group per width that plain
transformers loads; bad budgets exit 2 naming the field."""

import itertools
import json
import random

import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM

from compress import api
from compress.errors import UsageError
from compress.allocation import lower_hull
from compress.quant.mixed import LayerErrors, allocate_bits, average_bits, options
from compress.recipe import load_recipe


def _layers(seed, n=6, widths=(2, 3, 4, 8)):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        base, decay = rnd.uniform(0.1, 10), rnd.uniform(0.3, 0.7)
        out.append(LayerErrors(f"l{i}", rnd.choice([64, 128, 256]), {b: base * decay ** b * rnd.uniform(0.8, 1.2) for b in widths}))
    return out


def _error(layers, bits):
    return sum(L.errors[bits[L.name]] for L in layers)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [2.5, 3.0, 3.5, 5.0, 7.9])
def test_allocation_fits_the_budget_and_beats_every_uniform_width_that_fits(seed, budget):
    layers = _layers(seed)
    bits = allocate_bits(layers, budget)
    assert set(bits) == {L.name for L in layers} and all(b in (2, 3, 4, 8) for b in bits.values())
    assert average_bits(layers, bits) <= budget + 1e-9
    for w in (2, 3, 4, 8):
        if w <= budget:
            assert _error(layers, bits) <= _error(layers, {L.name: w for L in layers}) + 1e-12
    # maximal: no single layer can move to its next hull point within the budget
    spent = sum(L.params * bits[L.name] for L in layers)
    total = sum(L.params for L in layers)
    for L in layers:
        opts = options(L)
        nxt = [opts[k][2] for k in lower_hull(opts) if opts[k][2] > bits[L.name]]
        if nxt:
            assert spent + L.params * (nxt[0] - bits[L.name]) > budget * total


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_near_the_brute_force_optimum(seed):
    layers = _layers(seed, n=5)
    budget = 3.5
    total = sum(L.params for L in layers)
    best = min(_error(layers, dict(zip([L.name for L in layers], c)))
               for c in itertools.product((2, 3, 4, 8), repeat=len(layers))
               if sum(L.params * b for L, b in zip(layers, c)) <= budget * total)
    got = _error(layers, allocate_bits(layers, budget))
    assert got <= 2.0 * best  # a greedy on convex hulls: close to the knapsack's optimum, never below it
    assert got >= best - 1e-12


def _hull_widths(errors: dict[int, float]) -> list[tuple[int, float]]:
    opts = options(LayerErrors("l", 1, errors))
    return [(opts[k][2], opts[k][1]) for k in lower_hull(opts)]


def test_hull_drops_dominated_and_non_convex_points():
    assert _hull_widths({2: 10.0, 3: 9.9, 4: 1.0, 8: 0.5}) == [(2, 10.0), (4, 1.0), (8, 0.5)]  # 3 lies above the chord
    assert _hull_widths({2: 5.0, 3: 6.0, 4: 1.0}) == [(2, 5.0), (4, 1.0)]  # more bits, more error: never taken


def test_a_budget_below_the_narrowest_width_is_refused():
    with pytest.raises(ValueError, match="narrowest"):
        allocate_bits(_layers(0, widths=(3, 4)), 2.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("mixed") / "llama", "llama")


def _recipe(model, out, gptq, **export):
    return load_recipe({"model": str(model), "calibration": {"samples": 8, "seq_len": 64, "batch_size": 4},
                        "passes": [{"gptq": {"group_size": 16, **gptq}}], "eval": {"perplexity": None},
                        "export": {"path": str(out), **export}})


def test_a_mixed_run_exports_one_group_per_width_that_transformers_loads(tiny, tmp_path):
    out = tmp_path / "mixed"
    rep = api.run(_recipe(tiny, out, {"bits": 3.5}))
    mixed = json.loads((out / "compress.json").read_text())["mixed_precision"]
    assert mixed["budget"] == 3.5 and 3.0 <= mixed["average_bits"] <= 3.5
    layers = {r["name"]: r for r in rep["layers"]}
    assert all(layers[n]["info"]["bits"] == b for n, b in mixed["layers"].items())  # each layer quantized at its width
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    widths = {g["weights"]["num_bits"] for g in groups.values()}
    assert widths == set(mixed["layers"].values()) and len(widths) > 1
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.isfinite(model(input_ids=torch.randint(0, 320, (1, 12))).logits).all()


@pytest.mark.parametrize("gptq, export, msg", [({"bits": 1.5}, {}, "between"), ({"bits": 3.5, "widths": [4, 8]}, {}, "between"),
                                               ({"bits": 3.5}, {"target": "vllm"}, "widths")])
def test_bad_budgets_exit_2_before_any_work(tiny, tmp_path, gptq, export, msg):
    with pytest.raises((UsageError, ValueError), match=msg):
        api.run(_recipe(tiny, tmp_path / "o", gptq, **export))
    assert not (tmp_path / "o").exists()
