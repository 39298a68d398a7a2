"""Spending a budget across layers, each with a few options of (cost, error): the greedy
water-filling that the low-rank rank allocation (``compress.lowrank.allocate``) and the
mixed-precision bit allocation (``compress.quant.mixed``) share.

Every layer starts at its cheapest option; the step buying the most error per unit of cost is
taken next: to the layer's next vertex on its lower convex hull of error against cost, or, once
that no longer fits the budget, to the best option on the way that does. On convex error curves
this is the optimum for what it spends, and it never spends over the budget.
"""

from __future__ import annotations

import heapq


def lower_hull(opts: list) -> list[int]:
    """Indices of ``opts`` ((cost, error, ...), cheapest first) on the lower convex hull of error
    against cost."""
    hull: list[int] = []
    for k in range(len(opts)):
        while len(hull) >= 2 and slope(opts[hull[-2]], opts[hull[-1]]) <= slope(opts[hull[-1]], opts[k]):
            hull.pop()  # hull[-1] lies above the chord: never the better buy
        hull.append(k)
    return hull


def slope(a, b) -> float:
    """Error removed per unit of cost from option a to option b."""
    return (a[1] - b[1]) / max(b[0] - a[0], 1)


def water_fill(opts: list[list], budget: float) -> list[int]:
    """The option index each layer takes: ``opts[i]`` is layer i's options (cost, error, ...),
    cheapest first, error decreasing; the total cost starts at every layer's first option and
    grows by the greedy steps (module docstring) while it stays within ``budget``."""
    hulls = [lower_hull(o) for o in opts]
    at = [0] * len(opts)  # each layer's option
    spent = sum(o[0][0] for o in opts)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        o, cur = opts[i], opts[i][at[i]]
        nxt = next((k for k in hulls[i] if k > at[i]), None)
        if nxt is None:
            return
        fit = [k for k in range(at[i] + 1, nxt + 1) if spent + o[k][0] - cur[0] <= budget]
        if fit:  # the hull's next vertex, or the option before it buying the most per unit of cost
            k = nxt if fit[-1] == nxt else max(fit, key=lambda k: slope(cur, o[k]))
            heapq.heappush(heap, (-slope(cur, o[k]), i, k))

    for i in range(len(opts)):
        push(i)
    while heap:
        _, i, k = heapq.heappop(heap)
        if spent + opts[i][k][0] - opts[i][at[i]][0] <= budget:
            spent += opts[i][k][0] - opts[i][at[i]][0]
            at[i] = k
        push(i)  # its next step (or a smaller one, where this one no longer fits)
    return at
