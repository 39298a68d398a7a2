"""Plan: which passes apply to each Linear, and every configuration error, before any work.

The planner knows no pass family: each pass says which Linears it takes (``matches``), why a
layer cannot take it (``check``), and which neighbours it cannot stand with (``conflicts``,
``validate``). Errors are grouped so one message names every layer with the same problem.
"""

from __future__ import annotations

from torch import nn

from compress.arch.families import find_blocks
from compress.errors import UsageError
from compress.passes import Pass


def _span(idx: list[int]) -> str:
    return f"block {idx[0]}" if len(idx) == 1 else f"blocks {idx[0]}-{idx[-1]}"


def link_passes(passes: list[Pass]) -> None:
    """Let each pass see the passes after it (awq leaves quantization to a later rtn/gptq pass;
    sparsegpt followed by gptq on the same targets absorbs it into one joint solve)."""
    for k, p in enumerate(passes):
        p.link(passes[k + 1 :])


class _Problems:
    """Problems found while planning, grouped for one error per kind."""

    def __init__(self, blocks_path: str):
        self.blocks_path = blocks_path
        # (pass, reason) -> in_features -> {layer name within a block: blocks}
        self.checks: dict[tuple[Pass, str], dict[int, dict[str, list[int]]]] = {}
        self.conflicts: dict[tuple[str, str], dict[str, list[int]]] = {}  # (message, tail) -> layer -> blocks

    def where(self, layers: dict[str, list[int]]) -> str:
        return "; ".join(f"{n} ({_span(idx)} of {self.blocks_path})" for n, idx in layers.items())

    def raise_any(self) -> None:
        for (message, tail), layers in self.conflicts.items():
            raise UsageError(f"{message} ({self.where(layers)}){tail}")
        if self.checks:
            lines = []
            for (p, reason), by_in in self.checks.items():
                parts = []
                for k, layers in sorted(by_in.items()):
                    idx = sorted({b for bs in layers.values() for b in bs})
                    parts.append(f"in_features {k} of {', '.join(layers)} ({_span(idx)} of {self.blocks_path})")
                lines.append(f"{p.name}: {reason} {' and '.join(parts)}; {p.fix(sorted(by_in))}")
            raise UsageError("; ".join(lines))


def _plan_layer(full: str, name: str, i: int, mod: nn.Module, passes: list[Pass], problems: _Problems) -> list[Pass]:
    ps = [p for p in passes if not p.absorbed and p.matches(full, mod)]
    for p in ps:
        c = p.conflicts(ps)
        if c is not None and c.per_layer:
            raise UsageError(f"{full}: {c.message}")
        if c is not None:
            problems.conflicts.setdefault((c.message, c.tail), {}).setdefault(name, []).append(i)
    for p in ps:
        reason = p.check(full, mod)
        if reason:
            by_in = problems.checks.setdefault((p, reason.split(" in_features")[0]), {})
            by_in.setdefault(mod.in_features, {}).setdefault(name, []).append(i)
    return ps


def plan_targets(blocks_path: str, blocks: nn.ModuleList, passes: list[Pass]) -> dict[str, list[Pass]]:
    """Which passes apply to each Linear (full names), checked before any work is done."""
    plan: dict[str, list[Pass]] = {}
    problems = _Problems(blocks_path)
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            full = f"{blocks_path}.{i}.{name}"
            ps = _plan_layer(full, name, i, mod, passes, problems)
            if ps:
                plan[full] = ps
    problems.raise_any()
    # (a pass that also compresses modules outside the blocks, a token embedding, has work without them)
    if any(p.in_stage("apply") for p in passes) and not plan and not any(p.in_stage("apply_outside") for p in passes):
        raise UsageError("no Linear layer in the decoder blocks matches the passes' `targets` (minus `ignore`)")
    return plan


def check_plan(source, model: nn.Module, passes: list[Pass]) -> tuple[list[Pass], dict[str, list[Pass]]]:
    """Link the passes and plan which apply to each Linear, raising every
    configuration error before any work (callers run it before creating output folders).
    Returns the passes that run (absorbed ones dropped) and the plan."""
    blocks_path, blocks = find_blocks(model, source.config.model_type, getattr(source.config, "num_hidden_layers", None))
    link_passes(passes)
    passes = [p for p in passes if not p.absorbed]
    return passes, plan_targets(blocks_path, blocks, passes)
