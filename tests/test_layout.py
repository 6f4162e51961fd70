"""The package's rooms and the direction of their imports, read from the source with `ast`.

    files     (bottom)  checkpoint files on disk; knows nothing of any model
    model               the math; reaches fastpath only through model/backend.py
    io                  checkpoints in and out, tokenizer, progress bar
    training, verify    side by side: neither imports the other
    experiments         the paper's comparisons at laptop scale: tasks, metrics, the report
    cli       (top)     every command; nothing imports it

A file may import its own room and the rooms below it. `fastpath` (beside the package)
may import `minencdec.model` and nothing else of minencdec. Every import statement counts,
also the ones inside functions (a lazy import is still a dependency), and no chain of
imports between files may come back to where it started.

Negative controls: a planted upward import, a planted sideways import (training ->
verify), a planted second door into fastpath, and a planted cycle are each reported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"files": 0, "model": 1, "io": 2, "training": 3, "verify": 3, "experiments": 4, "cli": 5}
FASTPATH_DOOR = "minencdec.model.backend"       # the one module of minencdec that imports fastpath


def sources(root=ROOT) -> dict[str, str]:
    """Dotted module name -> source, for every .py file of minencdec/ and fastpath/."""
    out = {}
    for package in ("minencdec", "fastpath"):
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path.read_text()
    return out


def imports(name: str, source: str, modules) -> set[str]:
    """The project modules that module `name` imports (relative imports resolved; `from P
    import m` counts as importing P.m when that is a module, else P)."""
    is_package = name + ".__init__" in modules or any(m.startswith(name + ".") for m in modules)
    here = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:          # `import a.b.c` where only a.b is ours
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def room(module: str) -> str | None:
    """'model', 'io', ... for minencdec.<room>...; 'fastpath'; None for minencdec/__init__."""
    parts = module.split(".")
    if parts[0] == "fastpath":
        return "fastpath"
    return parts[1] if len(parts) > 1 else None


def violations(srcs: dict[str, str]) -> list[str]:
    """Every import that breaks the rules of the module docstring, and every cycle."""
    modules = set(srcs)
    graph = {m: imports(m, s, modules) for m, s in srcs.items()}
    bad = []
    for m, targets in graph.items():
        r = room(m)
        for t in sorted(targets):
            rt = room(t)
            if r == "fastpath":
                if rt not in ("fastpath", "model"):
                    bad.append(f"{m} -> {t}: fastpath may import minencdec.model only")
            elif rt == "fastpath":
                if m != FASTPATH_DOOR:
                    bad.append(f"{m} -> {t}: only {FASTPATH_DOOR} may import fastpath")
            elif r is None:                        # minencdec/__init__.py: the public names
                if rt == "cli":
                    bad.append(f"{m} -> {t}: nothing imports the command line")
            elif rt is None:
                bad.append(f"{m} -> {t}: import the module itself, not the package's front door")
            elif rt not in RANK or r not in RANK:
                bad.append(f"{m} -> {t}: {rt if rt not in RANK else r} is not a room of the table")
            elif RANK[rt] > RANK[r]:
                bad.append(f"{m} -> {t}: {r} may not import {rt} (it is above)")
            elif RANK[rt] == RANK[r] and rt != r:
                bad.append(f"{m} -> {t}: {r} and {rt} sit side by side and may not import each other")
    bad += [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_go_down_and_never_close_a_cycle():
    srcs = sources()
    assert {room(m) for m in srcs} == set(RANK) | {"fastpath", None}, "a room is missing or unknown"
    assert violations(srcs) == []


def test_every_file_stays_readable_in_size():
    """One idea per file: none over ~400 lines."""
    long = {m: s.count("\n") for m, s in sources().items() if s.count("\n") > 420}
    assert long == {}


def _planted(module, line):
    srcs = sources()
    srcs[module] = srcs[module] + "\n" + line + "\n"
    return violations(srcs)


def test_negative_controls_planted_imports_are_reported():
    up = _planted("minencdec.model.layers", "from minencdec.cli import main")
    assert any("model may not import cli" in v for v in up), up
    lazy = _planted("minencdec.model.gemma2", "def f():\n    from minencdec.io.pretrained import load_pretrained")
    assert any("model may not import io" in v for v in lazy), lazy
    sideways = _planted("minencdec.training.train", "from minencdec.verify import dumps")
    assert any("side by side" in v for v in sideways), sideways
    door = _planted("minencdec.model.stack", "import fastpath.norm")
    assert any("only minencdec.model.backend may import fastpath" in v for v in door), door
    wrong_way = _planted("fastpath.norm", "from minencdec.io import progress")
    assert any("fastpath may import minencdec.model only" in v for v in wrong_way), wrong_way
    cycle = _planted("minencdec.model.layers", "from . import stack")        # stack imports layers
    assert any(v.startswith("cycle:") and "minencdec.model.stack" in v for v in cycle), cycle
