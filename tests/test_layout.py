"""The import rules of ARCHITECTURE.md, checked on the source."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARTS = {"client": "harp.client", "server": "harp.server", "scheduler": "harp.scheduler",
         "trace": "harp.trace"}
ALLOWED = {"client": {"harp.trace"}, "server": set(), "scheduler": set(), "trace": set()}


def _imports(path: pathlib.Path, package: str) -> list[tuple[str, bool]]:
    """(module, at top level) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    found = []
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, id(node) in top))
    return found


def test_parts_import_only_harp_and_proto():
    for folder, name in PARTS.items():
        for path in (ROOT / folder).rglob("*.py"):
            for module, _ in _imports(path, name):
                for other, other_name in PARTS.items():
                    if other != folder and module.startswith(other_name) \
                            and other_name not in ALLOWED[folder]:
                        raise AssertionError(f"{path.relative_to(ROOT)} imports {module}")


def test_harp_core_imports_other_parts_only_lazily():
    for path in (ROOT / "harp").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        package = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts[:-1])
        for module, top_level in _imports(path, package or "harp"):
            if any(module.startswith(p) for p in PARTS.values()):
                assert not top_level, f"{path.relative_to(ROOT)} imports {module} at top level"


def test_import_harp_stays_light():
    code = ("import sys, harp\n"
            "heavy = [m for m in ('grpc', 'harp.client', 'harp.server', 'harp.scheduler', "
            "'numba') if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
