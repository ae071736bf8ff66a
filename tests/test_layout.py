"""The import rules of ARCHITECTURE.md, checked on the source, lazy imports included.

- `client/`, `server/`, `scheduler/`, `trace/` import `harp/` and `proto/`, and not each
  other, except that `client/` may use `trace/` to record.
- `harp/` imports none of the other folders, `proto/` included, except its entry points
  (`harp/connection.py`, `harp/cli/`, and the lazy `harp.RawKernel` export of
  `harp/__init__.py`), and those only inside the function that needs them.
- `proto/` imports only `harp/` and itself.
- `k8s/` (the DRA driver) imports `harp/`, `proto/` and `client/` (it attaches
  through the scheduler client), and nothing imports it but the command line.
- No module imports itself back through others: the import graph has no cycle.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"harp": "harp", "client": "harp.client", "server": "harp.server",
           "scheduler": "harp.scheduler", "trace": "harp.trace", "proto": "harp.proto",
           "k8s": "harp.k8s"}
PARTS = ("harp.client", "harp.server", "harp.scheduler", "harp.trace", "harp.k8s")
ALLOWED = {"harp.client": {"harp.trace", "harp.proto"}, "harp.server": {"harp.proto"},
           "harp.scheduler": {"harp.proto"}, "harp.trace": {"harp.proto"},
           "harp.proto": set(), "harp.k8s": {"harp.client", "harp.proto"}}
#: May import the parts, lazily: harp.connect, the command line, the harp.RawKernel export,
#: and the `harp run` start-up hook.
ENTRY_POINTS = ("harp.connection", "harp.cli", "harp", "harp.runhook")
OTHERS = (*PARTS, "harp.proto")


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _owner(module: str) -> str:
    """The part (folder) a module belongs to."""
    for other in OTHERS:
        if module == other or module.startswith(other + "."):
            return other
    return "harp"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(module: str, path: pathlib.Path) -> list[tuple[str, bool, int]]:
    """(imported project module, at top level, line) for every runtime import."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            names = subs if len(subs) == len(node.names) else [target, *subs]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, id(node) in top, node.lineno))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_parts_import_only_harp_proto_and_what_they_may():
    bad = []
    for module, imports in GRAPH.items():
        mine = _owner(module)
        if mine == "harp":
            continue
        for target, _, line in imports:
            theirs = _owner(target)
            if theirs not in ("harp", mine) and theirs not in ALLOWED[mine]:
                bad.append(f"{_where(module, line)} imports {target}")
    assert not bad, "\n".join(bad)


def test_harp_core_imports_other_folders_only_from_entry_points_and_lazily():
    bad = []
    for module, imports in GRAPH.items():
        if _owner(module) != "harp":
            continue
        entry = module in ENTRY_POINTS or module.startswith("harp.cli.")
        for target, top_level, line in imports:
            if _owner(target) == "harp":
                continue
            if not entry:
                bad.append(f"{_where(module, line)} imports {target} (harp/ is the lowest layer)")
            elif top_level:
                bad.append(f"{_where(module, line)} imports {target} at top level "
                           "(entry points import the parts lazily)")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    edges = {m: sorted({t for t, _, _ in imports}) for m, imports in GRAPH.items()}
    # The package __init__ of harp re-exports for users; modules that import `harp` itself
    # (the lazy `harp.connect`) would close a loop through it that Python never runs.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if t == "harp":
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_lazy_imports():
    """The checks above are only as good as the graph: it must include imports inside
    functions (the client's lease connect imports the scheduler client lazily)."""
    lazy = [(t, top) for t, top, _ in GRAPH["harp.client.connect"] if t == "harp.client.pool"]
    assert lazy and not any(top for _, top in lazy)


def test_the_run_hook_spells_the_run_environment_alike():
    from harp import runenv, runhook
    for name in ("ENV_DEVICE", "ENV_TRACE", "ENV_CERT_DIR"):
        assert getattr(runhook, name) == getattr(runenv, name)


def test_import_harp_stays_light():
    code = ("import sys, harp\n"
            "heavy = [m for m in ('grpc', 'harp.client', 'harp.server', 'harp.scheduler', "
            "'harp.proto', 'numba') if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_worker_fork_server_imports_no_grpc():
    """The fork server imports harp.server.worker before it forks: no gRPC threads there."""
    code = "import sys, harp.server.worker\nprint('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
