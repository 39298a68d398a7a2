"""Gates and metric comparison on synthetic results (no model)."""

import pytest
from compress.eval.gates import check_gates, compare_metrics, failure_message

from compress.errors import UsageError
from compress.recipe import GatesConfig, load_recipe


def _results(ppl, acc, wppl):
    return {"perplexity": ppl, "tasks": {
        "lastword": {"metrics": {"acc": acc}, "higher_is_better": {"acc": True}, "stderr": {"acc": 0.01}},
        "doc": {"metrics": {"word_perplexity": wppl, "bits_per_byte": 1.0}, "higher_is_better": {"word_perplexity": False, "bits_per_byte": False}},
    }}


def test_compare_metrics_changes_and_recovery():
    rows = {r["name"]: r for r in compare_metrics(_results(11.0, 0.45, 30.0), _results(10.0, 0.50, 30.0))}
    assert set(rows) == {"perplexity", "lastword/acc", "doc/word_perplexity", "doc/bits_per_byte"}
    p = rows["perplexity"]
    assert p["rel_change"] == pytest.approx(0.1) and p["recovery"] == pytest.approx(10 / 11)  # lower is better: b / m
    a = rows["lastword/acc"]
    assert a["change"] == pytest.approx(-0.05) and a["recovery"] == pytest.approx(0.9) and a["stderr"] == 0.01
    # without a baseline: values only
    assert "recovery" not in compare_metrics(_results(11.0, 0.45, 30.0), None)[0]


def test_gates_pass_and_fail_each_kind():
    rows = compare_metrics(_results(10.4, 0.49, 31.0), _results(10.0, 0.50, 30.0))
    ok = check_gates(rows, GatesConfig(max_ppl_increase=0.05, min_recovery={"acc": 0.97}, max_drop={"acc": 0.02}))
    assert ok and all(g["passed"] for g in ok)
    assert {g["metric"] for g in ok if g["gate"] == "max_ppl_increase"} == {"perplexity", "doc/word_perplexity"}

    bad = check_gates(rows, GatesConfig(max_ppl_increase=0.035, min_recovery=0.99, max_drop={"lastword/acc": 0.005}))
    failed = {(g["gate"], g["metric"]) for g in bad if not g["passed"]}
    # +4% perplexity, +3.3% word perplexity; acc recovery 0.98; acc drop 0.01
    assert failed == {("max_ppl_increase", "perplexity"), ("min_recovery", "perplexity"), ("min_recovery", "lastword/acc"),
                      ("min_recovery", "doc/word_perplexity"), ("max_drop", "lastword/acc")}
    msg = failure_message(bad)
    assert "5 quality gate(s) failed" in msg and "lastword/acc" in msg and "perplexity" in msg


def test_gate_on_a_missing_metric_fails_and_names_it():
    rows = compare_metrics(_results(10.0, 0.5, 30.0), _results(10.0, 0.5, 30.0))
    (g,) = check_gates(rows, GatesConfig(max_drop={"exact_match": 0.01}))
    assert not g["passed"] and "exact_match" in g["message"] and "lastword/acc" in g["message"]


def test_recipe_gates_parse_percentages_and_name_bad_fields():
    r = load_recipe({"eval": {"gates": {"max_ppl_increase": "5%", "min_recovery": "97%", "max_drop": {"acc": "2%"}}}})
    assert r.eval.gates.max_ppl_increase == pytest.approx(0.05)
    assert r.eval.gates.min_recovery == pytest.approx(0.97) and r.eval.gates.max_drop == {"acc": pytest.approx(0.02)}
    for bad, field in [({"max_ppl_increse": 1}, "eval.gates.max_ppl_increse"), ({"max_drop": {"acc": "lots"}}, "eval.gates.max_drop"),
                       ({"min_recovery": 1.5}, "eval.gates.min_recovery"), ({"max_ppl_increase": "-1%"}, "eval.gates.max_ppl_increase")]:
        with pytest.raises(UsageError, match=field.replace(".", r"\.")):
            load_recipe({"eval": {"gates": bad}})
    with pytest.raises(UsageError, match=r"eval\.limit"):
        load_recipe({"eval": {"limit": 0}})
    assert load_recipe({"eval": {"tasks": "a, b.yaml"}}).eval.tasks == ["a", "b.yaml"]
