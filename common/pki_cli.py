"""cloudfed-pki: create a CA, issue aggregator and agent certificates, revoke them."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from cryptography import x509

from common.identity import IdentityError, SpiffeId
from common.pki import (
    CA_DAYS,
    CRL_DAYS,
    LEAF_DAYS,
    REVOCATION_REASONS,
    PkiDir,
    PkiError,
    issue_agent,
    issue_server,
)

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
    revoke = sub.add_parser("revoke", help="add a certificate to the CRL (crl.pem) and re-sign it")
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="file name of an issued certificate, e.g. aws-agent-1")
    which.add_argument("--serial", help="serial number in hex, for a certificate not in this directory")
    revoke.add_argument(
        "--reason", choices=sorted(REVOCATION_REASONS), default="unspecified", help="RFC 5280 reason"
    )
    revoke.add_argument("--days", type=float, default=CRL_DAYS, help=f"CRL lifetime (default {CRL_DAYS})")
    crl = sub.add_parser("crl", help="re-sign the CRL with a new lifetime (run before it expires)")
    crl.add_argument("--days", type=float, default=CRL_DAYS, help=f"CRL lifetime (default {CRL_DAYS})")
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
        elif args.cmd == "revoke":
            _revoke(pki, args.name, args.serial, args.reason, args.days)
        elif args.cmd == "crl":
            path = pki.write_crl(pki.revoked(), args.days)
            print(f"CRL {path} re-signed: {len(pki.revoked())} revoked, valid {args.days:g} days")
        else:
            now = dt.datetime.now(dt.UTC)
            revoked = {r.serial_number for r in pki.revoked()}
            print(f"{'NAME':<24} {'EXPIRES':<20} {'STATE':<9} SANS")
            for name, issued in pki.list():
                left = issued.not_valid_after_utc - now
                state = "expired" if left.total_seconds() < 0 else ("expiring" if left.days < 14 else "valid")
                state = "revoked" if issued.serial_number in revoked else state
                expires = f"{issued.not_valid_after_utc:%Y-%m-%d %H:%M}"
                print(f"{name:<24} {expires:<20} {state:<9} {_sans(issued)}")
    except (PkiError, IdentityError, ValueError, OSError) as exc:
        print(f"cloudfed-pki: {exc}", file=sys.stderr)
        return 2
    return 0


def _revoke(pki: PkiDir, name: str | None, serial_hex: str | None, reason: str, days: float) -> None:
    if name is not None:
        if name == "ca" or not pki.cert(name).is_file():
            raise PkiError(f"no issued certificate named {name!r} in {pki.root} (see 'cloudfed-pki list')")
        cert = x509.load_pem_x509_certificate(pki.cert(name).read_bytes())
        if cert.issuer != pki.load_ca().cert.subject:
            raise PkiError(f"{pki.cert(name)} was not issued by this directory's CA")
        serial, label = cert.serial_number, f"{name} ({_sans(cert)})"
    else:
        assert serial_hex is not None
        try:
            serial = int(serial_hex.removeprefix("0x"), 16)
        except ValueError:
            raise PkiError(f"--serial {serial_hex!r} is not a hex number") from None
        label = f"serial {serial:#x}"
    added = pki.revoke(serial, REVOCATION_REASONS[reason], days)
    verb = "revoked" if added else "was already revoked; CRL re-signed for"
    print(f"{label} {verb}: {pki.crl}. Copy it to every aggregator (tls.crl): it is re-read within seconds.")


if __name__ == "__main__":
    sys.exit(main())
