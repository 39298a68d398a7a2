"""The architecture's own rules, checked on the source: no import cycle, no private name imported
across modules, no function over 70 lines (Triton kernels aside), no engine function over 8
parameters, an engine that never asks what kind of pass it holds; and a new pass family that
plugs in with its own folder and one registry line (tests/example_family)."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import compressed_in_memory, save_tiny

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs() -> dict[str, Path]:
    """Import name -> folder, from pyproject's folder-to-package mapping (quant/ -> compress.quant)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg.get("package-dir", {})
    return {pkg: ROOT / mapping.get(pkg, pkg.replace(".", "/")) for pkg in cfg["packages"]}


def _modules() -> dict[str, Path]:
    """Every installed module of the project: dotted name -> file."""
    out = {}
    for pkg, folder in _package_dirs().items():
        for f in folder.glob("*.py"):
            if f.is_symlink():
                continue
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    out["compress.cli"] = ROOT / "cli.py"
    return out


def _type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, here: str, modules: dict[str, Path]):
    """(imported module, names) of every import in ``tree`` outside ``if TYPE_CHECKING:`` blocks,
    the ones inside functions included (they are dependencies all the same)."""
    skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for b in t.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, f in modules.items():
        for mod, names in _imports(ast.parse(f.read_text()), name, modules):
            for target in [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules] or [mod]:
                if target in modules and target != name:
                    graph[name].add(target)
            if names and any(f"{mod}.{n}" not in modules for n in names) and mod in modules and mod != name:
                graph[name].add(mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert len(graph) > 60 and graph["compress.engine.sweep"]  # the walk found the tree
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    bad = []
    for name, f in modules.items():
        for mod, names in _imports(ast.parse(f.read_text()), name, modules):
            if mod.startswith("compress"):
                bad += [f"{name}: from {mod} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []


def _functions(paths):
    for f in paths:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f, node


def _is_triton_kernel(node) -> bool:
    return any("triton.jit" in ast.unparse(d) or ast.unparse(d) in ("jit", "triton.autotune") for d in node.decorator_list)


def test_no_function_is_over_70_lines():
    files = list(_modules().values()) + sorted((ROOT / "benchmarks").glob("*.py"))
    long = [f"{f.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for f, n in _functions(files) if n.end_lineno - n.lineno + 1 > 70 and not _is_triton_kernel(n)]
    assert long == []


def test_no_engine_function_takes_over_8_parameters():
    engine = sorted((ROOT / "compress" / "engine").glob("*.py"))

    def count(a: ast.arguments) -> int:
        names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs] + [x.arg for x in (a.vararg, a.kwarg) if x]
        return len([n for n in names if n not in ("self", "cls")])

    wide = [f"{f.name}:{n.lineno} {n.name}" for f, n in _functions(engine) if count(n.args) > 8]
    assert wide == []


def test_the_engine_never_asks_what_kind_of_pass_or_module_it_holds():
    """The engine runs stages (``Pass.in_stage``) and the module protocol; pass kinds, families'
    report keys and module classes are not its business."""
    asks = ("effects", "quantizes ", "quantizes\"", "prunes", "factorizes", "smooths", "distills", ".scope", "QuantLinear", "Int8Linear",
            "LowRankLinear", '"pattern"', '"rank"', "hasattr(")
    found = []
    for f in sorted((ROOT / "compress" / "engine").glob("*.py")) + [ROOT / "compress" / "checkpoint" / "export.py"]:
        text = f.read_text()
        found += [f"{f.name}: {a}" for a in asks if a in text]
    assert found == []


# ---------------------------------------------------------------- a new family: its folder + a registry line


@pytest.fixture
def sign_family(monkeypatch):
    import compress.modules as modules
    import compress.passes as passes
    import compress.registry as registry

    monkeypatch.setattr(registry, "FAMILIES", (*registry.FAMILIES, "example_family.passes"))  # the registry line
    yield
    # unregister, so the next test imports the family afresh (and no other test sees it)
    passes._REGISTRY.pop("sign", None)
    modules._TYPES[:] = [t for t in modules._TYPES if not t.__module__.startswith("example_family")]
    for name in [m for m in sys.modules if m.startswith("example_family")]:
        del sys.modules[name]


def test_a_new_family_runs_exports_and_reloads_through_the_protocol(sign_family, tmp_path):
    from compress.api import run
    from compress.checkpoint.load import load
    from compress.recipe import load_recipe

    path = save_tiny(tmp_path / "m", "llama")
    rec = load_recipe({"model": str(path), "calibration": {"samples": 4, "seq_len": 32}, "passes": [{"sign": {}}],
                       "eval": {"perplexity": None}, "export": {"path": str(tmp_path / "out")}})
    report = run(rec)
    assert len(report["layers"]) == 14 and all(l["passes"] == ["sign"] for l in report["layers"])
    assert all(0 < l["info"]["rel_weight_error"] < 1 for l in report["layers"])  # sign(W)·α keeps ~60% of a Gaussian row
    reloaded = load(tmp_path / "out", dtype=torch.float32)
    kinds = {type(m).__name__ for m in reloaded.modules()}
    assert "SignLinear" in kinds and "QuantLinear" not in kinds
    mem = compressed_in_memory(path, rec, tmp_path / "mem")
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, mem(input_ids=x).logits, rtol=0, atol=1e-5)


def test_the_other_families_ordering_rules_see_the_new_one(sign_family, tmp_path):
    from compress.api import run
    from compress.errors import UsageError
    from compress.recipe import load_recipe

    path = save_tiny(tmp_path / "m", "llama")
    rec = load_recipe({"model": str(path), "calibration": {"samples": 4, "seq_len": 32}, "passes": [{"sign": {}}, {"wanda": {}}],
                       "eval": {"perplexity": None}, "export": {"path": str(tmp_path / "out")}})
    with pytest.raises(UsageError, match="pruning pass comes after a quantization pass"):
        run(rec)


# ---------------------------------------------------------------- the CLI is wiring


def test_cli_help_does_not_import_torch():
    import subprocess
    import sys as _sys

    code = "import sys; from compress.cli import app; from typer.testing import CliRunner; " \
           "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_every_method_preset_names_registered_passes_and_their_options():
    from compress.passes import get_pass
    from compress.recipe import METHODS

    for name, m in METHODS.items():
        for p in m.passes:
            fields = get_pass(p.name).Config.model_fields
            assert set(p.takes) | set(p.fixed) <= set(fields), (name, p.name)
