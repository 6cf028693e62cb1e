"""cloudfed-pki: create a CA and issue aggregator and agent certificates."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from cryptography import x509

from common.identity import IdentityError, SpiffeId
from common.pki import CA_DAYS, LEAF_DAYS, PkiDir, PkiError, issue_agent, issue_server

TRUST_DOMAIN_FILE = "trust-domain"


def _trust_domain(pki: PkiDir) -> str:
    path = pki.root / TRUST_DOMAIN_FILE
    if not path.exists():
        raise PkiError(f"{path} missing; run 'cloudfed-pki init --trust-domain ...' first")
    return path.read_text().strip()


def _sans(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "-"
    names = [
        str(v)
        for t in (x509.DNSName, x509.IPAddress, x509.UniformResourceIdentifier)
        for v in san.get_values_for_type(t)
    ]
    return ",".join(names) or "-"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="cloudfed-pki", description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("pki"), help="PKI directory (default: ./pki)")
    sub = p.add_subparsers(dest="cmd", required=True)
    init = sub.add_parser("init", help="create the federation CA")
    init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. fed.example.org")
    init.add_argument("--name", default="cloudfed CA", help="CA common name")
    init.add_argument("--days", type=float, default=CA_DAYS, help=f"lifetime (default {CA_DAYS})")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    srv = sub.add_parser("server", help="issue the aggregator's server certificate")
    srv.add_argument("--name", default="aggregator", help="file name (default: aggregator)")
    srv.add_argument("--dns", action="append", default=[], help="DNS SAN (repeatable)")
    srv.add_argument("--ip", action="append", default=[], help="IP SAN (repeatable)")
    srv.add_argument("--days", type=float, default=LEAF_DAYS, help=f"lifetime (default {LEAF_DAYS})")
    agent = sub.add_parser("agent", help="issue an agent certificate with a SPIFFE id")
    agent.add_argument("--cloud", required=True, help="cloud name, e.g. aws")
    agent.add_argument("--name", required=True, help="agent name, e.g. agent-1")
    agent.add_argument("--days", type=float, default=LEAF_DAYS, help=f"lifetime (default {LEAF_DAYS})")
    sub.add_parser("list", help="list issued certificates")
    args = p.parse_args(argv)
    pki = PkiDir(args.dir)
    try:
        if args.cmd == "init":
            domain = SpiffeId.validate_trust_domain(args.trust_domain)
            pki.init(args.name, args.days, force=args.force)
            (pki.root / TRUST_DOMAIN_FILE).write_text(domain + "\n")
            print(f"CA written to {pki.ca_cert} (trust domain {domain})")
        elif args.cmd == "server":
            cert, key = pki.save(args.name, issue_server(pki.load_ca(), args.dns, args.ip, args.days))
            print(f"server certificate {cert}, key {key}")
        elif args.cmd == "agent":
            spiffe = SpiffeId(_trust_domain(pki), args.cloud, args.name)
            SpiffeId.parse(spiffe.uri)  # validates the segments
            cert, key = pki.save(f"{args.cloud}-{args.name}", issue_agent(pki.load_ca(), spiffe, args.days))
            print(f"agent certificate {cert} for {spiffe}, key {key}")
        else:
            now = dt.datetime.now(dt.UTC)
            print(f"{'NAME':<24} {'EXPIRES':<20} {'STATE':<9} SANS")
            for name, issued in pki.list():
                left = issued.not_valid_after_utc - now
                state = "expired" if left.total_seconds() < 0 else ("expiring" if left.days < 14 else "valid")
                expires = f"{issued.not_valid_after_utc:%Y-%m-%d %H:%M}"
                print(f"{name:<24} {expires:<20} {state:<9} {_sans(issued)}")
    except (PkiError, IdentityError, ValueError, OSError) as exc:
        print(f"cloudfed-pki: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
