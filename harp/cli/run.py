"""`harp run`: run an unmodified program with its GPU calls served by HARP.

    harp run --device local:cpu -- python app.py
    harp run --device harp://gpu-host:50051 --trace run.harptrace -- python app.py
    harp run --lease lease.json -- python app.py        # a lease saved by `harp attach --save`
    harp run -- python app.py                           # HARP_DEVICE, else the stored lease

The program's `numba.cuda` becomes HARP's shim (harp.client.numba_shim) in its
interpreter and in every Python process it starts: `harp run` sets
`HARP_RUN_DEVICE` and makes sure the interpreter's site-packages holds the
start-up hook (`harp-run.pth` + `_harp_run_hook.py`, see harp.runhook),
which acts only when that variable is set. Then it replaces itself with the
program (exec), so signals and the exit status are the program's own.

Why a .pth hook in site-packages, written here rather than by pip: it is the
mechanism Python runs at every start-up of that interpreter, for child
processes too, without touching PYTHONPATH or a `sitecustomize.py` the user may
have; setuptools puts no top-level .pth into a wheel (editable installs least of
all), so `harp run` installs it on first use, and checks it every time.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import site
import sys
import sysconfig
from pathlib import Path

from ..errors import ArgumentError, HarpError
from .. import runhook


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", default=None,
                       help="device: local:cpu (in the program's process, trusting its "
                            "kernels), local:BACKEND[:INDEX], or harp://HOST:PORT")
    where.add_argument("--lease", default=None, metavar="FILE",
                       help="a lease file (harp attach --save FILE); default: HARP_DEVICE, "
                            "else the stored lease")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="record the program's device calls into FILE (child processes: "
                        "FILE's stem.PID.harptrace); default: $HARP_TRACE")
    p.add_argument("--trace-payloads", action="store_true",
                   help="with --trace: also record the bytes of every write")
    p.add_argument("--cert-dir", default=None, help="client certificate directory (harp://)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (or HARP_TLS_CA)")
    p.add_argument("--tls-cert", default=None, help="client certificate (or HARP_TLS_CERT)")
    p.add_argument("--tls-key", default=None, help="client key (or HARP_TLS_KEY)")
    p.add_argument("--install-hook", action="store_true",
                   help="only install the start-up hook into this interpreter's "
                        "site-packages, and say where")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM [ARGS...]")


def hook_files(directory: Path) -> dict[Path, str]:
    """The hook's files and their contents, in `directory`."""
    source = Path(runhook.__file__).read_text(encoding="utf-8")
    return {directory / runhook.PTH_NAME: runhook.PTH_LINE,
            directory / f"{runhook.HOOK_MODULE}.py": source}


def _site_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_paths()["purelib"])]
    if site.ENABLE_USER_SITE:
        dirs.append(Path(site.getusersitepackages()))
    return dirs


def ensure_hook() -> Path:
    """Make sure this interpreter's site-packages (else the user site) holds the hook;
    returns the directory. Rewrites files whose content is not this HARP's."""
    problems = []
    for directory in _site_dirs():
        files = hook_files(directory)
        try:
            if all(p.exists() and p.read_text(encoding="utf-8") == text
                   for p, text in files.items()):
                return directory
            directory.mkdir(parents=True, exist_ok=True)
            for path, text in files.items():
                tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
            return directory
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror or exc}")
    lines = "\n  ".join(problems)
    raise HarpError(
        "cannot install harp run's start-up hook:\n  " + lines + "\nrun `harp run "
        "--install-hook` once as a user who may write there, or put these two files in a "
        f"site-packages directory of this interpreter: {runhook.PTH_NAME} containing\n  "
        f"{runhook.PTH_LINE.strip()}\nand {runhook.HOOK_MODULE}.py, a copy of {runhook.__file__}")


def _target(args: argparse.Namespace) -> str:
    if args.device:
        target = args.device
        if not target.startswith(("local:", "harp://", "harp+insecure://", "unix:")):
            raise ArgumentError(f"--device takes local:BACKEND[:INDEX] or harp://HOST:PORT, got "
                                f"{target!r}")
        if target.startswith("local:"):
            from ..connection import parse_local
            parse_local(target)
        return target
    if args.lease:
        path = Path(args.lease).expanduser()
        if not path.is_file():
            raise ArgumentError(f"--lease {args.lease}: no such lease file")
        from ..lease import Lease
        Lease.load(path)            # fail here, clearly, not in the program
        return f"lease:{path.resolve()}"
    if os.environ.get("HARP_DEVICE"):
        return os.environ["HARP_DEVICE"]
    from ..lease import default_lease_path
    if default_lease_path().exists():
        return f"lease:{default_lease_path().resolve()}"
    raise ArgumentError("harp run needs a device: --device local:cpu or harp://HOST:PORT, "
                        "--lease FILE, HARP_DEVICE, or a lease stored by `harp attach`")


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command and environment to exec (installs the hook)."""
    command = args.program[1:] if args.program[:1] == ["--"] else list(args.program)
    if not command:
        raise ArgumentError("harp run: give the program after --, e.g. "
                            "harp run --device local:cpu -- python app.py")
    env = dict(os.environ)
    env[runhook.ENV_DEVICE] = _target(args)
    ensure_hook()
    for opt, var in (("tls_ca", "HARP_TLS_CA"), ("tls_cert", "HARP_TLS_CERT"),
                     ("tls_key", "HARP_TLS_KEY")):
        if getattr(args, opt):
            env[var] = str(Path(getattr(args, opt)).expanduser().resolve())
    if args.cert_dir:
        env[runhook.ENV_CERT_DIR] = str(Path(args.cert_dir).expanduser().resolve())
    env_trace = env.pop("HARP_TRACE", None)   # under harp run, the shim traces per process
    trace_to = args.trace or env_trace
    if trace_to:
        # the program's processes share this name: the shim gives each its own file
        trace = Path(trace_to).expanduser().resolve()
        trace.unlink(missing_ok=True)   # the first process to open a session writes it
        env[runhook.ENV_TRACE] = str(trace)
        if args.trace_payloads:
            env["HARP_TRACE_PAYLOADS"] = "1"
    return command, env


def _warn_other_interpreter(program: str) -> None:
    """The hook lives in this interpreter's site-packages: say so if the program is a Python
    from another place (another virtual environment, the system's)."""
    name = os.path.basename(program)
    if not re.fullmatch(r"python[0-9.]*", name):
        return
    here = os.path.dirname(os.path.abspath(sys.executable))
    if os.path.dirname(os.path.abspath(program)) != here:
        print(f"harp run: warning: {program} is not the Python that HARP is installed in "
              f"({sys.executable}); the program sees HARP only if that Python has HARP too "
              "(run `harp run --install-hook` with its harp)", file=sys.stderr)


def check_device(env: dict[str, str]) -> None:
    """Open and close the device the program will get, so that a wrong name, an
    unreachable server or a stale lease is one line here, before the program starts."""
    from harp.runenv import open_from_env
    saved = {k: os.environ.get(k) for k in ("HARP_TLS_CA", "HARP_TLS_CERT", "HARP_TLS_KEY")}
    os.environ.update({k: env[k] for k in saved if k in env})
    try:
        device, what = open_from_env(env, trace=False)
        device.close()
    except HarpError as exc:
        raise HarpError(f"cannot open the device for the program ({env[runhook.ENV_DEVICE]}): "
                        f"{exc}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args: argparse.Namespace) -> int:
    if args.install_hook:
        print(f"harp run: start-up hook installed in {ensure_hook()}")
        return 0
    command, env = prepare(args)
    check_device(env)
    program = shutil.which(command[0], path=env.get("PATH")) or command[0]
    _warn_other_interpreter(program)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, command, env)
    except OSError as exc:
        print(f"harp run: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    return 0  # pragma: no cover - execve does not return
