"""The ``sparsity`` section of ``compress.json``: what the pruning passes did, per layer.

compressed-tensors' own ``sparsity_config`` stays empty (current vLLM refuses a 2:4 one), so the
structure lives here: ``compress.load`` reads ``structure`` and ``targets`` to put 2:4 layers on
semi-structured sparse kernels. A leaf: it reads the run's ``LayerReport``s only.
"""

from __future__ import annotations


def sparsity_metadata(layers: list) -> dict | None:
    """The section from the run's ``LayerReport``s (those a pruning pass ran on carry a
    ``pattern`` in their info); None when no layer was pruned."""
    pruned = {r.name: r.info for r in layers if "pattern" in r.info}
    if not pruned:
        return None
    patterns = sorted({i["pattern"] for i in pruned.values()})
    n = sum(i["weights"] for i in pruned.values())
    return {
        "structure": patterns[0] if len(patterns) == 1 else "mixed",
        "targets": sorted(pruned),
        "global_sparsity": round(sum(i["sparsity"] * i["weights"] for i in pruned.values()) / max(n, 1), 6),
        "layers": {k: {"sparsity": i["sparsity"], "pattern": i["pattern"]} for k, i in sorted(pruned.items())},
    }
