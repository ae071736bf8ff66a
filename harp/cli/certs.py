"""`harp certs`: the pool CA and the certificates it issues, for mutual TLS."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import security
from ..output import emit_json, table
from .common import positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None,
                   help="certificate directory (default: $HARP_CERT_DIR or ~/.config/harp/certs)")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="create the pool CA")
    init.add_argument("--name", default="HARP pool CA")
    init.add_argument("--overwrite", action="store_true", help="replace an existing CA")
    issue = sub.add_parser("issue", help="issue a certificate from the CA: a pool server's "
                                         "(server), a user's (client), an operator's (admin) "
                                         "or a monitoring system's (monitor)")
    issue.add_argument("role", choices=list(security.ROLES),
                       help="server: a pool server, registering under NAME; client: a user, "
                            "who sees and ends only its own leases; admin: every lease, drain; "
                            "monitor: reads metrics endpoints and nothing else")
    issue.add_argument("name", help="the holder's identity, and the file names NAME.pem and "
                                    "NAME.key")
    issue.add_argument("--san", action="append", default=[],
                       help="extra DNS name or IP the server is reached by (repeatable)")
    issue.add_argument("--days", type=positive_int, default=825,
                       help="days the certificate is valid (default 825)")
    issue.add_argument("--overwrite", action="store_true")
    ls = sub.add_parser("ls", help="list the certificates in the directory")
    ls.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    directory = args.dir or security.default_cert_dir()
    if args.action == "init":
        path = security.init_ca(directory, name=args.name, overwrite=args.overwrite)
        print(f"created pool CA {path}")
    elif args.action == "issue":
        cert, key = security.issue(directory, args.role, args.name, sans=args.san,
                                   days=args.days, overwrite=args.overwrite)
        print(f"issued {args.role} certificate {cert} (key {key})")
    else:
        rows = [dict(file=str(p), **security.describe(p)) for p in sorted(directory.glob("*.pem"))]
        if args.json:
            emit_json(rows)
        else:
            table(["file", "role", "subject", "expires", "names"],
                  [[Path(r["file"]).name, r["role"], r["subject"], r["not_after"][:10],
                    ", ".join(r["sans"])] for r in rows])
    return 0
