"""The house drawn from the imports: no circle among the modules of specserve.cluster and
specserve.actors (what each imports when it loads), and none in the algorithm core even counting
the imports inside functions."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"cluster": "specserve.cluster", "actors": "specserve.actors"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in ROOTS.items():
        for p in (REPO / folder).rglob("*.py"):
            parts = p.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def imports(name: str, path: Path, known: set[str], inside_functions: bool) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if inside_functions else _module_level(tree.body)
    deps = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` names a module; else the package itself
                deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
    return {d for d in deps if d in known and d != name}


def _module_level(body):
    """The statements run when the module loads (not function or class bodies' functions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _module_level(getattr(node, field, []) if not isinstance(node, ast.ClassDef) or field != "body"
                                     else [n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def graph_of(inside_functions: bool, only: str = "") -> dict[str, set[str]]:
    mods = {n: p for n, p in modules().items() if n.startswith(only)}
    return {n: imports(n, p, set(mods), inside_functions) for n, p in mods.items()}


def test_no_module_imports_itself_in_a_circle():
    graph = graph_of(inside_functions=False)
    assert len(graph) > 60 and graph["specserve.cluster.runtime.engine"]
    assert cycles(graph) == []


def test_the_core_has_no_circle_even_inside_functions():
    core = "specserve.cluster.speculation."
    graph = graph_of(inside_functions=True, only=core)
    graph = {m: {d for d in deps} for m, deps in graph.items()}
    assert "specserve.cluster.speculation.shape" in graph["specserve.cluster.speculation.adaptive"]
    assert cycles(graph) == []


def test_the_circle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
