"""Backend plugins: a separate package that declares a `harp.backends` entry point.

The package is built in a temporary directory and installed with pip into a
private target directory; everything that uses it runs in a subprocess with
that directory on PYTHONPATH, so this test process's entry points stay as
they are.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import harp

TIMEOUT = 60

PYPROJECT = """\
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-harp"
version = "0.1.0"
description = "A tiny HARP backend plugin, for HARP's tests"

[project.entry-points."harp.backends"]
tiny = "tiny_harp:TinyBackend"
tiny_v99 = "tiny_harp:FutureBackend"
tiny_broken = "tiny_harp_not_installed:Backend"
tiny_notabackend = "tiny_harp:NotABackend"

[tool.setuptools]
py-modules = ["tiny_harp"]
"""

MODULE = '''\
"""A tiny HARP backend: the cpu backend under another name."""
import dataclasses

from harp.backends.cpu import CpuBackend

DEVICE_NAME = "Tiny plugin device"


class TinyBackend(CpuBackend):
    name = "tiny"

    def describe(self, index):
        return dataclasses.replace(super().describe(index), name=DEVICE_NAME, backend="tiny")


class FutureBackend(CpuBackend):
    """Written against a backend interface this HARP does not have."""
    name = "tiny_v99"
    interface_version = 99


class NotABackend:
    pass
'''


def _harp_script() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "harp")
    if os.path.exists(beside):
        return beside
    return shutil.which("harp")


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """Environment variables under which the tiny plugin package is installed."""
    pytest.importorskip("setuptools")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                      timeout=TIMEOUT).returncode != 0:
        pytest.skip("pip is not available")
    root = tmp_path_factory.mktemp("plugin")
    pkg, target = root / "pkg", root / "target"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "tiny_harp.py").write_text(MODULE)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(target), str(pkg)],
        capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "tiny_harp.py").exists()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH")) if p)
    env.pop("HARP_DEVICE", None)
    return {"env": env, "cwd": str(root)}


def _python(plugin_env, source: str) -> dict:
    """Run `source` in a fresh interpreter with the plugin installed; it prints one JSON value."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)],
                            capture_output=True, text=True, timeout=TIMEOUT, **plugin_env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_plugin_backend_connects_and_round_trips(plugin_env):
    out = _python(plugin_env, """
        import json
        import harp
        from harp.backends import backend_names

        names = backend_names()
        dev = harp.connect("local:tiny", memory="64MiB")
        buf = dev.alloc(1000)
        data = bytes(range(256)) * 3
        dev.write(buf, 5, data)
        ok = dev.read(buf, 5, len(data)) == data
        dev.free(buf)
        dev.synchronize()
        mem = dev.mem_info()
        dev.close()
        # a second connect in the same process works too
        dev2 = harp.connect("local:tiny:0", memory="1MiB")
        dev2.close()
        print(json.dumps({"names": names, "ok": ok, "total": mem.total,
                          "kind": dev.info.kind}))
    """)
    assert out["ok"] is True
    assert "tiny" in out["names"]
    assert "cpu" in out["names"]
    assert out["total"] == 64 << 20
    assert out["kind"] == "cpu"


def test_plugin_backend_in_list_devices(plugin_env):
    rows = _python(plugin_env, """
        import json
        from harp.backends import list_devices
        print(json.dumps(list_devices()))
    """)
    _check_devices_rows(rows)


def test_harp_devices_cli_lists_plugin(plugin_env):
    script = _harp_script()
    if script is None:
        pytest.skip("the harp console script is not installed")
    result = subprocess.run([script, "devices", "--json"], capture_output=True, text=True,
                            timeout=TIMEOUT, **plugin_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tiny" in result.stdout
    _check_devices_rows(json.loads(result.stdout))


def _check_devices_rows(rows):
    assert isinstance(rows, list)
    for row in rows:
        assert {"backend", "available", "reason", "devices"} <= set(row), row
        assert isinstance(row["available"], bool)
        assert isinstance(row["devices"], list)
    by_name = {row["backend"]: row for row in rows}
    assert "cpu" in by_name and by_name["cpu"]["available"] is True
    tiny = by_name["tiny"]
    assert tiny["available"] is True
    assert len(tiny["devices"]) >= 1
    assert tiny["devices"][0]["name"] == "Tiny plugin device"
    assert tiny["devices"][0]["backend"] == "tiny"
    # broken plugins are listed as unavailable with a reason, not a crash
    for bad in ("tiny_v99", "tiny_broken", "tiny_notabackend"):
        assert by_name[bad]["available"] is False, by_name[bad]
        assert by_name[bad]["reason"]
        assert by_name[bad]["devices"] == []
    assert "99" in by_name["tiny_v99"]["reason"]


def test_plugin_of_another_interface_version_is_refused(plugin_env):
    out = _python(plugin_env, """
        import json
        import harp
        from harp.backends import BACKEND_INTERFACE_VERSION
        try:
            harp.connect("local:tiny_v99")
        except harp.BackendError as exc:
            print(json.dumps({"error": str(exc), "type": type(exc).__name__,
                              "version": BACKEND_INTERFACE_VERSION}))
        else:
            print(json.dumps({"error": None}))
    """)
    assert out["error"] is not None, "connecting to a plugin of interface version 99 worked"
    message = out["error"]
    assert "tiny_v99" in message
    assert "99" in message
    assert str(out["version"]) in message
    assert "version" in message


@pytest.mark.parametrize("name,words", [
    ("tiny_broken", ["tiny_broken", "failed to load"]),
    ("tiny_notabackend", ["tiny_notabackend", "Backend"]),
])
def test_broken_plugins_give_backend_error(plugin_env, name, words):
    out = _python(plugin_env, f"""
        import json
        import harp
        try:
            harp.connect("local:{name}")
        except harp.BackendError as exc:
            print(json.dumps({{"error": str(exc)}}))
        else:
            print(json.dumps({{"error": None}}))
    """)
    assert out["error"] is not None
    for word in words:
        assert word in out["error"]


def test_unknown_backend_lists_known_backends():
    with pytest.raises(harp.BackendError) as ei:
        harp.connect("local:nosuch")
    message = str(ei.value)
    assert "nosuch" in message
    assert "cpu" in message
    from harp.backends import backend_names
    for name in backend_names():
        assert name in message


def test_connect_twice_in_a_fresh_process(tmp_path):
    """`harp.connect` stays callable after its first use (no submodule shadows it)."""
    source = """
        import harp
        for _ in range(3):
            dev = harp.connect("local:cpu", memory="1MiB")
            dev.close()
        print("ok")
    """
    env = dict(os.environ)
    env.pop("HARP_DEVICE", None)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True,
                            text=True, timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
