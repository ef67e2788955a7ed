"""The shape of the package, checked from its imports (issue 15's rules):

- no import cycle among the modules of src/pynbd, counting imports made under
  ``TYPE_CHECKING`` and inside functions;
- no module imports a private name (``_x``) from another package of pynbd;
- ``pynbd.cli`` and ``pynbd.kernel`` import no state machine from ``pynbd.proto``
  (handshake, transmission, connection): they use the client's connection object.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
#: The state machines of pynbd.proto, which only the clients and the server drive.
STATE_MACHINES = {
    "pynbd.proto.handshake",
    "pynbd.proto.transmission",
    "pynbd.proto.server",
    "pynbd.proto.server_handshake",
    "pynbd.proto.server_transmission",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "pynbd").rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("pynbd")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pynbd"):
                continue
            names = [a.name for a in node.names]
            # "from . import x" names a submodule when there is one.
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            out += [(s, []) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in known]
            if rest:
                out.append((target, rest))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {
        name: {t for t, _ in _imports(name, path, known) if t in known and t != name}
        for name, path in mods.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    graph = _graph()
    # An edge goes to the module named: "from ..client import X" is an edge to
    # pynbd.client (its __init__), "from . import sync" one to pynbd.client.sync.
    assert _cycles(graph) == []


def test_no_private_name_from_another_package() -> None:
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        home = ".".join(name.split(".")[:2])
        for target, names in _imports(name, path, known):
            if ".".join(target.split(".")[:2]) == home:
                continue
            bad += [
                f"{name}: {n} from {target}"
                for n in names
                if n.startswith("_") and not n.endswith("__")  # __version__ is public
            ]
    assert bad == []


def test_cli_and_kernel_use_no_proto_state_machine() -> None:
    mods = _modules()
    known = set(mods)
    bad = [
        f"{name} imports {target}"
        for name, path in mods.items()
        if name.split(".")[:2] in (["pynbd", "cli"], ["pynbd", "kernel"])
        for target, _ in _imports(name, path, known)
        if target in STATE_MACHINES
    ]
    assert bad == []


def test_the_checks_see_imports() -> None:
    """The graph is not empty by mistake: known edges are in it."""
    graph = _graph()
    assert "pynbd.proto.wire" in graph["pynbd.proto.records"]
    assert "pynbd.client" in graph["pynbd.kernel.dial"]
    assert "pynbd.client.connection" in graph["pynbd.client"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
