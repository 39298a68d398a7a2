import pytest

from compress.errors import InputError, UsageError
from compress.recipe import DEFAULT_RECIPE, apply_override, load_recipe


def test_defaults_and_overrides():
    r = load_recipe(DEFAULT_RECIPE, ["passes.0.gptq.bits=3", "calibration.samples=16", "export.path=out/x"])
    (name, cfg), = r.pass_configs()
    assert name == "gptq" and cfg.bits == 3 and cfg.group_size == 64 and cfg.ignore == ["lm_head"]
    assert r.calibration.samples == 16 and r.calibration.seq_len == 512
    assert r.resolved()["passes"][0]["gptq"]["damp"] == 0.01  # defaults are filled in


def test_unknown_field_names_the_path():
    with pytest.raises(UsageError, match=r"passes\.0\.gptq\.bitz: unknown field"):
        load_recipe({"passes": [{"gptq": {"bitz": 4}}]})
    with pytest.raises(UsageError, match=r"calibration\.sampels"):
        load_recipe({"calibration": {"sampels": 4}})


def test_bad_values_and_unknown_pass():
    with pytest.raises(UsageError, match=r"passes\.0\.rtn\.bits"):
        load_recipe({"passes": [{"rtn": {"bits": 9}}]})
    with pytest.raises(UsageError, match="unknown pass 'awq2'.*gptq"):
        load_recipe({"passes": [{"awq2": {}}]})


def test_override_errors():
    with pytest.raises(UsageError, match="KEY=VALUE"):
        apply_override({}, "seed")
    with pytest.raises(UsageError, match="has no item 3"):
        load_recipe(DEFAULT_RECIPE, ["passes.3.gptq.bits=2"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(InputError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_fingerprint_ignores_eval_and_export():
    a = load_recipe(DEFAULT_RECIPE)
    b = load_recipe(DEFAULT_RECIPE, ["export.path=elsewhere", "eval.baseline=false"])
    c = load_recipe(DEFAULT_RECIPE, ["passes.0.gptq.bits=3"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
