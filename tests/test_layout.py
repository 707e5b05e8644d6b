"""The package layout's rules (issue 23): imports point down (launch → actors → configs → rl → backbone/rewards),
no import circle anywhere, and loading a config imports neither Ray nor torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "actors", "configs", "rl", "backbone", "rewards")
RANK = {"launch": 0, "actors": 1, "configs": 2, "rl": 3, "backbone": 4, "rewards": 4}
"""Lower rank = higher layer; a module may import only its own layer or lower ones (backbone and rewards are peers)."""


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _graph() -> dict[str, set[str]]:
    """Module → project modules it imports (anywhere in the file, function-level imports included)."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else resolve(node.module))
            elif isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
        graph[name] = {d for d in deps if d and d != name and mods[d].name != "__init__.py"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    graph = _graph()
    assert len(graph) > 100   # the walk found the project
    assert _cycles(graph) == []


def test_imports_point_down():
    upward = [f"{m} -> {d}" for m, deps in _graph().items() for d in deps
              if RANK[d.split(".")[0]] < RANK[m.split(".")[0]]]
    assert upward == []


def test_every_actors_module_lives_in_a_role_folder():
    loose = sorted(p.name for p in (ROOT / "actors").glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"actors/ holds role subpackages only; move {loose} into one"


def test_loading_a_config_imports_neither_ray_nor_torch():
    code = ("import sys\nimport configs.schema\ncfg = configs.schema.load_config('tiny_cpu')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout   # so no torch.distributed either
