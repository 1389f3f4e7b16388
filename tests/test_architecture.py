"""The package's structure, checked from its source with ``ast`` (no import of the project).

docs/architecture.md states the rules; this file keeps them true:

* the import graph of ``megatron_lite`` (imports at module top and inside functions alike) has no
  cycle;
* no module imports another module's private (``_name``) attribute;
* layer order: a module imports only its own layer or lower ones
  (parallel/ops/utils/errors/config_field -> layers/data -> model -> config -> checkpoint ->
  training -> cpt/eval/convert/planning/integrations/testing/analysis -> entrypoints);
* no function over 80 lines in config/, checkpoint/, training/, cpt/;
* production modules read no ``MEGATRON_LITE_*`` variable other than the user-facing ones
  (fault-injection hooks live in ``megatron_lite/testing/``);
* in the top half (config/checkpoint/training/cpt, entrypoints), an import written inside a
  function carries a one-line reason (a comment on its line or the line above).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "megatron_lite"
LAYERS = [
    {"parallel", "ops", "utils", "errors", "config_field"},
    {"layers", "data"},
    {"model"},
    {"config"},
    {"checkpoint"},
    {"training"},
    {"cpt", "eval", "convert", "planning", "integrations", "testing", "analysis"},
    {"entrypoints"},
]
TOP_HALF = {"config", "checkpoint", "training", "cpt", "entrypoints"}
USER_FACING_ENV = {"MEGATRON_LITE_TRACEBACK", "MEGATRON_LITE_DS_SHM"}
MAX_FUNCTION_LINES = 80


def _layer(mod: str) -> int | None:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def _modules() -> dict[str, str]:
    mods = {}
    for d, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return mods


MODS = _modules()
TREES = {m: ast.parse(open(p, encoding="utf-8").read(), p) for m, p in MODS.items()}


def _resolve(mod: str, node: ast.ImportFrom) -> str | None:
    base = mod if MODS[mod].endswith("__init__.py") else mod.rsplit(".", 1)[0]
    if node.level:
        parts = base.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        return base + ("." + node.module if node.module else "")
    return node.module


def _imports(mod: str):
    """(target module in the package, imported attribute or None, node) for every import."""
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            for a in node.names:
                yield target, a.name, node


def _edges() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for m in MODS:
        for target, name, _ in _imports(m):
            if not target or not target.startswith(PKG):
                continue
            full = f"{target}.{name}" if name and f"{target}.{name}" in MODS else target
            while full not in MODS and "." in full:
                full = full.rsplit(".", 1)[0]
            if full in MODS and full != m:
                edges[m].add(full)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(edges[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    edges = defaultdict(set, edges)
    for v in sorted(set(edges) | {w for ws in list(edges.values()) for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_placed_in_a_layer():
    unplaced = sorted(m for m in MODS if m != PKG and _layer(m) is None)
    assert not unplaced, f"modules outside the layer order (add them to LAYERS and the doc): {unplaced}"


def test_import_graph_has_no_cycle():
    assert _cycles(_edges()) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{m}: from {t} import {n}" for m in MODS for t, n, _ in _imports(m)
           if n and n.startswith("_") and not n.startswith("__")]
    assert bad == []


def test_lower_layers_never_import_higher_ones():
    upward = [f"{m} -> {t}" for m, ts in _edges().items() for t in ts
              if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_no_long_functions_in_the_top_half():
    long = []
    for m, tree in TREES.items():
        if m.split(".")[1:2] and m.split(".")[1] in TOP_HALF:
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def test_production_reads_no_test_hook_variables():
    reads = []
    for m, tree in TREES.items():
        if m.startswith(f"{PKG}.testing"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    node.value.startswith("MEGATRON_LITE_") and node.value != "MEGATRON_LITE_" \
                    and node.value not in USER_FACING_ENV:  # the bare prefix filters names
                reads.append(f"{m}: {node.value}")
    assert reads == []


def test_user_facing_variables_are_documented():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert [v for v in sorted(USER_FACING_ENV) if v not in readme] == []


def _function_imports_without_reason(mod: str) -> list[str]:
    lines = open(MODS[mod], encoding="utf-8").read().splitlines()
    out = []
    for fn in ast.walk(TREES[mod]):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in here and not above.startswith("#"):
                    out.append(f"{mod}:{node.lineno}: {here.strip()}")
    return sorted(set(out))


@pytest.mark.parametrize("top", sorted(TOP_HALF))
def test_imports_inside_functions_say_why(top):
    bad = [x for m in MODS if m.split(".")[1:2] == [top] for x in _function_imports_without_reason(m)]
    assert bad == []
