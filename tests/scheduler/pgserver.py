"""A throwaway PostgreSQL server for the tests, from the machine's own binaries.

initdb and pg_ctl refuse to run as root, so as root they run as the `postgres`
OS user (`.ci/run` creates it where it is missing). The server listens on a unix
socket in a temporary directory only (no TCP), trusts local connections, and runs
without fsync; `stop()` shuts it down and removes everything.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def find_binaries() -> Path | None:
    """The folder with initdb, pg_ctl and postgres: on PATH, else the newest Debian one."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


def unavailable() -> str | None:
    """Why no test server can start here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test]')"
    if find_binaries() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                "/usr/lib/postgresql/*/bin: apt-get install postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return ("running as root, and there is no 'postgres' OS user to run initdb as "
                    "(initdb refuses root): useradd --system postgres (.ci/run does)")
    return None


class PostgresServer:
    """One PostgreSQL server on a unix socket; `database(name)` makes a fresh database."""

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="harp-pg-"))
        self.data = self.root / "data"
        self.socket_dir = str(self.root)
        self._as: dict = {}
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self._started = False

    def _run(self, *args: str) -> None:
        result = subprocess.run([str(self.bin / args[0]), *args[1:]], cwd=self.root,
                                capture_output=True, text=True, timeout=120, **self._as)
        if result.returncode != 0:
            log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{log[-2000:]}")

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--no-sync")
        options = (f"-k {self.socket_dir} -c listen_addresses='' -F -c max_connections=200 "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-t", "60", "-o", options, "start")
        self._started = True
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"host={self.socket_dir} dbname={database} user=postgres"

    def database(self, name: str) -> str:
        """A new, empty database; its DSN."""
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        try:
            if self._started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                          "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
