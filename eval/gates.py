"""Regression gates: each metric of the model against the baseline's, measured in the same run.

A metric row (``compare_metrics``) holds both values, the change, and the recovery (model /
baseline when higher is better, baseline / model when lower is better: 1.0 = nothing lost).
``check_gates`` turns ``eval.gates`` into one row per (gate, metric) with ``passed``.
"""

from __future__ import annotations

PPL_METRICS = ("perplexity", "word_perplexity", "byte_perplexity")


def _ratio(a: float, b: float) -> float | None:
    """a / b; 1.0 for 0 / 0 (nothing lost), None when only b is 0 (undefined)."""
    if b == 0:
        return 1.0 if a == 0 else None
    return a / b


def compare_metrics(model: dict, baseline: dict | None) -> list[dict]:
    """Per-model results ({"perplexity": ..., "tasks": {t: {"metrics", "higher_is_better", "stderr"}}})
    -> one row per metric: name, task, metric, higher_is_better, model, baseline, stderr, change,
    rel_change, recovery."""
    rows = []

    def add(name, task, metric, hib, m, b, stderr=None):
        row = {"name": name, "task": task, "metric": metric, "higher_is_better": hib, "model": m, "baseline": b}
        if stderr is not None:
            row["stderr"] = stderr
        if b is not None:
            row["change"] = m - b
            r = _ratio(m, b)
            row["rel_change"] = None if r is None else r - 1
            row["recovery"] = _ratio(m, b) if hib else _ratio(b, m)
        rows.append(row)

    if "perplexity" in model:
        add("perplexity", None, "perplexity", False, model["perplexity"], baseline.get("perplexity") if baseline else None)
    for task, res in model.get("tasks", {}).items():
        base = (baseline or {}).get("tasks", {}).get(task, {}).get("metrics", {}) if baseline else {}
        for metric, v in res["metrics"].items():
            add(f"{task}/{metric}", task, metric, res["higher_is_better"].get(metric, True), v, base.get(metric) if baseline else None,
                res.get("stderr", {}).get(metric))
    return rows


def _select(rows: list[dict], key: str) -> list[dict]:
    """A gate key names a metric fully (``pydoc_lastword/acc``) or by its metric name (``acc``:
    that metric of every task)."""
    return [r for r in rows if key in (r["name"], r["metric"])]


def check_gates(rows: list[dict], gates) -> list[dict]:
    """``gates`` (a GatesConfig) against metric rows -> gate rows with ``passed`` and a message."""
    out = []

    def result(gate, key, limit, sel, value_of, ok, describe):
        if not sel:
            have = ", ".join(r["name"] for r in rows) or "none"
            out.append({"gate": gate, "metric": key, "limit": limit, "value": None, "passed": False,
                        "message": f"{gate} {key}: no such metric was evaluated (evaluated: {have})"})
            return
        for r in sel:
            if r.get("baseline") is None:
                out.append({"gate": gate, "metric": r["name"], "limit": limit, "value": None, "passed": False,
                            "message": f"{gate} {r['name']}: no baseline value to compare with"})
                continue
            v = value_of(r)
            if v is None:
                out.append({"gate": gate, "metric": r["name"], "limit": limit, "value": None, "passed": False,
                            "message": f"{gate} {r['name']}: undefined for baseline {r['baseline']:.4g} and model {r['model']:.4g}"})
                continue
            out.append({"gate": gate, "metric": r["name"], "limit": limit, "value": v, "passed": ok(v), "message": describe(r, v)})

    if gates.max_ppl_increase is not None:
        lim = gates.max_ppl_increase
        sel = [r for r in rows if r["metric"] in PPL_METRICS]
        result("max_ppl_increase", "perplexity", lim, sel, lambda r: r["rel_change"], lambda v: v <= lim + 1e-12,
               lambda r, v: f"max_ppl_increase {r['name']}: {r['baseline']:.4g} -> {r['model']:.4g} ({v:+.2%}, limit +{lim:.2%})")
    if gates.min_recovery is not None:
        items = gates.min_recovery.items() if isinstance(gates.min_recovery, dict) else [(None, gates.min_recovery)]
        for key, lim in items:
            sel = rows if key is None else _select(rows, key)
            result("min_recovery", key or "all", lim, sel, lambda r: r.get("recovery"), lambda v, lim=lim: v >= lim - 1e-12,
                   lambda r, v, lim=lim: f"min_recovery {r['name']}: recovery {v:.4f} ({r['baseline']:.4g} -> {r['model']:.4g}), limit {lim:.4f}")
    if gates.max_drop is not None:
        items = gates.max_drop.items() if isinstance(gates.max_drop, dict) else [(None, gates.max_drop)]
        for key, lim in items:
            sel = [r for r in rows if r["higher_is_better"]] if key is None else _select(rows, key)

            def drop(r):
                return (r["baseline"] - r["model"]) if r["higher_is_better"] else (r["model"] - r["baseline"])

            result("max_drop", key or "higher-is-better", lim, sel, drop, lambda v, lim=lim: v <= lim + 1e-12,
                   lambda r, v, lim=lim: f"max_drop {r['name']}: {r['baseline']:.4g} -> {r['model']:.4g} (drop {v:.4g}, limit {lim:.4g})")
    return out


def failure_message(gate_rows: list[dict]) -> str:
    failed = [g for g in gate_rows if not g["passed"]]
    return f"{len(failed)} quality gate(s) failed: " + "; ".join(g["message"] for g in failed)
