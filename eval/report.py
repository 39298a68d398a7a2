"""Reports: one versioned JSON shape (``eval/report.schema.json``) and its Markdown summary.

The JSON is what ``--json`` prints and what every export holds as ``report.json``; the Markdown
(``report.md`` in every export, ``--markdown FILE`` on the commands) is written for CI job
summaries: the before/after table, the gates, sizes and bits per parameter, the layers with the
highest error, time and peak memory.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_SCHEMA = "compress.report/2"
SCHEMA_FILE = Path(__file__).with_name("report.schema.json")


def json_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(report: dict) -> None:
    """Raise ``jsonschema.ValidationError`` where ``report`` does not follow the schema."""
    import jsonschema  # only in the dev extra (the tests validate reports with it): not a dependency of the package

    jsonschema.validate(report, json_schema())


def _num(v, digits: int = 5) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _mb(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f} MB"


def lowrank_summary(lr: dict) -> str:
    """One line on a low-rank checkpoint (``inspect_checkpoint``'s ``lowrank``)."""
    kept, dense = lr["parameters_kept"], lr["parameters_dense"]
    return (f"low-rank ({lr['method']}, {lr['export']}): {lr['layers']} layers factored; the targeted Linears keep "
            f"{kept:,} of {dense:,} parameters ({1 - kept / max(dense, 1):.1%} removed)")


def layer_errors(layers: list[dict]) -> tuple[str, list[tuple[dict, float]]]:
    """("output" or "weight", [(layer, its relative error)] worst first): the output errors
    measured on calibration data, or where there was none, the weights' own errors."""
    out = [(l, l["rel_output_error"]) for l in layers if l.get("rel_output_error") is not None]
    if out:
        return "output", sorted(out, key=lambda x: -x[1])
    w = [(l, l["info"]["rel_weight_error"]) for l in layers if "rel_weight_error" in l.get("info", {})]
    return "weight", sorted(w, key=lambda x: -x[1])


def distill_summary(d: dict) -> str:
    """One line on a distillation (the report's ``distill``)."""
    if d.get("scope") == "block":
        b = list(d.get("blocks", {}).values())
        gain = sum(x["error_before"] - x["error_after"] for x in b) / max(sum(x["error_before"] for x in b), 1e-30)
        return f"distillation (block, train {d.get('train')}): {len(b)} blocks trained; their output error {gain:.1%} lower on average"
    measure = ("held-out responses' cross-entropy" if d.get("heldout_measure") == "response_nll" else "held-out gap to the teacher")
    kind = "black-box" if d.get("teacher") == "black-box" else f"on-policy {d['on_policy']:g}" if d.get("on_policy") else "model"
    line = (f"distillation ({kind}, {d['loss']}, train {d['train']}): {d['steps']} steps, {d['tokens']:,} tokens seen, {d['seconds']:.0f} s "
            f"({d['stopped']}); {measure} {d['heldout_kl_start']:.4g} -> {d['heldout_kl_best']:.4g} (best at step "
            f"{d['best_step']}), held-out perplexity {d['heldout_ppl_start']:.4g} -> {d['heldout_ppl_best']:.4g}")
    pp = d.get("perplexity")
    if pp:
        line += f"; perplexity: compressed {pp['compressed']:.4g} -> distilled {pp['distilled']:.4g}"
        if pp.get("original") is not None:
            line += f" (original {pp['original']:.4g}" + (f", {pp['recovered']:.0%} of the loss recovered)" if pp.get("recovered") is not None else ")")
    return line


def loss_chart(curve: list[dict], points: int = 40) -> list[str]:
    """The training loss (and held-out perplexity) per step as a Mermaid xychart (GitHub, GitLab
    and most Markdown viewers draw it; elsewhere it reads as the numbers it is)."""
    rows = [r for r in curve if r.get("loss") is not None]
    if len(rows) < 2:
        return []
    stride = max(1, -(-len(rows) // points))
    rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return ["```mermaid", "xychart-beta", '    title "distillation loss per step"',
            f"    x-axis [{', '.join(str(r['step']) for r in rows)}]", '    y-axis "loss"',
            f"    line [{', '.join(format(r['loss'], '.5g') for r in rows)}]", "```"]


def to_markdown(report: dict, worst: int = 10) -> str:
    """The report as Markdown: title, gates, metrics, checkpoints, what compression and
    distillation did, the ``worst`` layers by error, time and memory; one section per helper,
    each its lines and a blank line, or nothing."""
    ev = report.get("eval") or {}
    kind = report.get("kind", "run")
    sections = [
        [f"## {report_title(report, ev, kind)}", ""],
        _gate_verdict(ev),
        _metrics_table(ev, kind),
        _gates_table(ev),
        _checkpoints_table(report, kind),
        _summaries(report),
        _layers_table(report.get("layers", []), worst),
        _time_line(report, ev),
        [f"<sub>{report.get('schema', REPORT_SCHEMA)}</sub>"],
    ]
    return "\n".join(line for lines in sections for line in lines) + "\n"


def report_title(report: dict, ev: dict, kind: str) -> str:
    """The report's heading: the command, the model and what it was measured against."""
    if kind == "run":
        return f"compress run: {report['model']['path']} → {report['export']['path']}"
    if kind == "distill":
        st = report.get("settings", {})  # without an evaluation (--no-eval) the names come from the settings
        student = ev["model"]["ref"] if "model" in ev else st.get("student")
        teacher = ev["baseline"]["ref"] if "baseline" in ev else st.get("teacher") if st.get("teacher") not in (None, "None") else None
        what = f"teacher {teacher}" if teacher else None
        if "blackbox" in st:
            what = ", ".join(filter(None, [what, "black-box: " + ", ".join(f"{k} {v}" for k, v in st["blackbox"].items())]))
        return f"compress distill: {student}" + (f" ({what})" if what else "")
    if kind == "compare":
        return f"compress compare: {ev['baseline']['ref']} vs {ev['model']['ref']}"
    return f"compress eval: {ev['model']['ref']}" + (f" (baseline {ev['baseline']['ref']})" if "baseline" in ev else "")


def _base_name(kind: str) -> str:
    return "baseline" if kind != "run" else "original"


def _gate_verdict(ev: dict) -> list[str]:
    if not ev.get("gates"):
        return []
    failed = [g for g in ev["gates"] if not g["passed"]]
    return [f"**Gates: {'FAILED' if failed else 'passed'}** ({len(ev['gates']) - len(failed)} of {len(ev['gates'])} passed)", ""]


def _metrics_table(ev: dict, kind: str) -> list[str]:
    if not ev.get("metrics"):
        return []
    has_base = any(m.get("baseline") is not None for m in ev["metrics"])
    head = ["metric", _base_name(kind), "compressed" if kind == "run" else "model"] if has_base else ["metric", "value"]
    if has_base:
        head += ["change", "recovery"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ev["metrics"]:
        arrow = "↑" if m["higher_is_better"] else "↓"
        val = _num(m["model"]) + (f" ± {_num(m['stderr'])}" if m.get("stderr") else "")
        if has_base:
            rel = m.get("rel_change")
            change = "–" if m.get("change") is None else f"{m['change']:+.4g}" + (f" ({rel:+.2%})" if rel is not None else "")
            lines.append(f"| {m['name']} {arrow} | {_num(m.get('baseline'))} | {val} | {change} | {_num(m.get('recovery'))} |")
        else:
            lines.append(f"| {m['name']} {arrow} | {val} |")
    return lines + [""]


def _gates_table(ev: dict) -> list[str]:
    if not ev.get("gates"):
        return []
    lines = ["| gate | metric | limit | value | result |", "|---|---|---|---|---|"]
    for g in ev["gates"]:
        lines.append(f"| {g['gate']} | {g['metric']} | {_num(g['limit'])} | {_num(g['value'])} | {'pass' if g['passed'] else '**FAIL**'} |")
    return lines + [""]


def _checkpoints_table(report: dict, kind: str) -> list[str]:
    rows = []
    if kind == "run":
        rows.append((_base_name(kind), report["model"]["path"], report["model"].get("size_bytes"), None))
        ex = report["export"]
        rows.append(("compressed", ex["path"], ex.get("size_bytes"), ex.get("bits_per_parameter")))
    else:
        for label in ("baseline", "model"):
            c = (report.get("checkpoints") or {}).get(label)
            if c:
                rows.append((label, c["path"], c.get("size_bytes"), c.get("bits_per_parameter")))
    if not rows:
        return []
    lines = ["| checkpoint | path | size on disk | bits/param |", "|---|---|---|---|"]
    for label, path, size, bpp in rows:
        lines.append(f"| {label} | `{path}` | {_mb(size)} | {_num(bpp, 3)} |")
    return lines + [""]


def _summaries(report: dict) -> list[str]:
    """The low-rank line, the distillation line and its loss chart, where the report has them."""
    lines = []
    lr = (report.get("export") or {}).get("lowrank")
    if lr:
        lines += [lowrank_summary(lr), ""]
    if report.get("distill"):
        lines += [distill_summary(report["distill"]), ""]
        chart = loss_chart(report["distill"].get("curve", []))
        if chart:
            lines += chart + [""]
    return lines


def _layers_table(layers: list[dict], worst: int) -> list[str]:
    kind_err, errs = layer_errors(layers)
    if not errs:
        return []
    ranked = any("rank" in l.get("info", {}) for l, _ in errs)
    lines = [f"Highest relative {kind_err} error (worst {min(worst, len(errs))} of {len(errs)} layers):", "",
             f"| layer | rel. {kind_err} error |" + (" rank | parameters kept |" if ranked else ""), "|---|---|" + ("---|---|" if ranked else "")]
    for l, e in errs[:worst]:
        row = f"| {l['name']} | {e:.4f} |"
        if ranked:
            i = l.get("info", {})
            row += f" {i.get('rank') if i.get('rank') is not None else 'dense'} | {i.get('params_kept', '')} of {i.get('params_dense', '')} |"
        lines.append(row)
    return lines + [""]


def _time_line(report: dict, ev: dict) -> list[str]:
    tm = report.get("time", {})
    parts = [f"{k.removesuffix('_s')} {tm[k]:.0f} s" for k in ("compress_s", "eval_s", "total_s") if k in tm]
    if report.get("peak_rss_mb") is not None:
        parts.append(f"peak RSS {report['peak_rss_mb']:.0f} MB")
    cached = [f"{label}: {', '.join(ev[label]['cached'])}" for label in ("baseline", "model") if ev.get(label, {}).get("cached")]
    if cached:
        parts.append("from the evaluation cache: " + "; ".join(cached))
    return ["Time: " + ", ".join(parts) + ".", ""] if parts else []
