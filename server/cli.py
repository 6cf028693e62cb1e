"""cloudfed-aggregator: run the aggregator daemon."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import sdnotify
from common.config import AggregatorConfig, load
from common.cpu_threads import set_torch_threads
from common.errors import CloudfedError
from common.logs import setup_logging
from common.revocation import RevocationError, RevocationList

if TYPE_CHECKING:
    from server.state import AgentCertificate

log = logging.getLogger("cloudfed.aggregator")


def seed(config: AggregatorConfig, init_from: Path | None) -> None:
    """Make sure a global version exists: seed version 0 from a safetensors file if the store is empty."""
    from safetensors.torch import load_file

    from server.checkpoints import CheckpointStore

    store = CheckpointStore(config.state_dir / "checkpoints")
    if store.latest() is not None:
        if init_from:
            log.info("state already holds version %d; ignoring --init-from", store.latest())
        return
    if init_from is not None:
        if not init_from.is_file():
            raise CloudfedError(f"--init-from: file not found: {init_from}")
        store.save(0, load_file(init_from), parent=None, metrics={"seeded_from": str(init_from)})
        return
    f = config.federation
    if not f.model_id:
        raise CloudfedError(f"no global version in {store.root}: set federation.model_id or pass --init-from")
    from agent.trainer import LoraSpec, initial_adapter

    log.info("seeding version 0 from %s (LoRA r=%d on %s)", f.model_id, f.lora_rank, list(f.target_modules))
    lora = LoraSpec(f.lora_rank, f.lora_alpha, f.target_modules, f.lora_dropout)
    store.save(0, initial_adapter(f.model_id, lora, f.seed), parent=None, metrics={"seeded_from": f.model_id})


async def serve(config: AggregatorConfig) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the TLS certificates and the CRL."""
    from server.app import build_aggregator

    agg = build_aggregator(config)
    await agg.start()
    if config.metrics_listen:
        from common.metrics import serve_metrics

        port = serve_metrics(config.metrics_listen, config.metrics_tls())
        log.info("metrics on %s (port %d)", config.metrics_listen, port)
    log.info("federation API on %s (port %d), health on %s", config.listen, agg.port, config.health_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        sdnotify.reloading()
        agg.reload()  # new handshakes use the re-read files; live connections stay unless revoked
        log.info("reload: certificates will be re-read at the next handshake, the CRL was re-read")
        sdnotify.notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    rounds = asyncio.create_task(agg.rounds.run(stop))
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(stop))
    sdnotify.notify("READY=1", f"STATUS=serving on {config.listen}")
    await stop.wait()
    log.info("shutting down")
    sdnotify.notify("STOPPING=1")
    await agg.stop(grace=10)
    for task in (rounds, watchdog):
        task.cancel()
    await asyncio.gather(rounds, watchdog, return_exceptions=True)


def status(config: AggregatorConfig) -> int:
    """Print the federation's state from the database (safe while the daemon runs)."""
    from server.admission import NO_DP
    from server.checkpoints import CheckpointStore
    from server.state import StateDB
    from server.stopping import finish_reason
    from server.version_ranking import best, describe

    path = config.state_dir / "cloudfed.db"
    if not path.exists():
        raise CloudfedError(f"no state database at {path}; has the aggregator run yet?")
    db = StateDB(path)
    versions = db.versions()
    print(f"state           {path}")
    print(f"global version  {versions[-1][0] if versions else '-'} ({len(versions)} committed)")
    ends = config.rounds
    if versions and (ends.max_versions or ends.early_stop_patience):
        done = finish_reason(versions[-1][0], db.version_evals(), ends)
        print(f"finished        {done or 'not yet'}")
    store = CheckpointStore(config.state_dir / "checkpoints")
    keep = config.checkpoints
    policy = (
        f"keep_last {keep.keep_last}, keep_every {keep.keep_every}, keep_best {keep.keep_best}"
        if keep.keep_last
        else "every version kept"
    )
    print(
        f"checkpoints     {len(store.versions())} on disk ({store.disk_bytes() / 1e6:.1f} MB), "
        f"{len(store.pruned())} pruned ({policy})"
    )
    chosen = best(store.versions(), db.version_evals())
    if chosen is None:
        print("best            none: no version on disk has evaluations yet")
    else:
        print(f"best            version {chosen[0]}: {chosen[1]} (what export --version best takes)")
    print("\nrounds (newest first)")
    print(
        f"  {'round':>5}  {'phase':<14} {'base':>4} {'new':>4}  {'uploads':>7}  {'each sent':>9}"
        f"  {'seconds':>7}  reason"
    )
    for r in db.rounds(limit=10):
        took = f"{(r.ended_at or time.time()) - r.started_at:7.1f}"
        new = "-" if r.new_version is None else str(r.new_version)
        each = _size(r.uploaded_bytes / r.uploaded) if r.uploaded else "-"
        print(
            f"  {r.round_id:>5}  {r.phase:<14} {r.base_version:>4} {new:>4}  "
            f"{r.uploaded:>3}/{r.participants:<3}  {each:>9}  {took}  {r.reason or ''}".rstrip()
        )
    evals = db.latest_evals()
    revocations = _revocations(config)
    print("\nagents")
    for row in db.agents():
        ev = evals.get(row.agent)
        last = f"eval loss {describe({row.agent: ev[1]})} at v{ev[0]}" if ev else "no eval yet"
        withheld = row.withheld
        if withheld is not None and (ev is None or withheld.version > ev[0]):
            last += f"; withheld its eval loss of v{withheld.version} ({withheld.reason}): {withheld.words}"
        ago = time.time() - row.last_seen
        noised = " (noised: its DP covers it)" if row.differential_privacy not in ("", NO_DP) else ""
        print(f"  {row.agent}  examples {row.num_examples}{noised}, joined {ago:.0f}s ago, {last}")
        print(f"    {_certificate_state(row.certificate, revocations)}")
        print(f"    differential privacy: {row.differential_privacy or 'not announced'}")
    db.close()
    return 0


def export(config: AggregatorConfig, args: argparse.Namespace) -> int:
    """Write the chosen global version to ``args.out`` and say which it was and why."""
    from server.export import export as write

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    choice = write(config, args.version, args.out, args.merge, args.base, args.force)
    merged = f" and {args.out / 'merged'}" if args.merge else ""
    print(f"exported global version {choice.version} ({choice.reason}) to {args.out}{merged}")
    return 0


def backup(config: AggregatorConfig, args: argparse.Namespace) -> int:
    """Copy the state directory to ``args.out`` (or a new backup in ``args.into``, keeping the
    newest ``args.keep``) and say what the copy holds."""
    from server.backup import backup as copy_state
    from server.backup import backup_into

    removed: list[Path] = []
    if args.into is not None:
        out, report, removed = backup_into(config.state_dir, args.into, args.keep)
    else:
        out, report = args.out, copy_state(config.state_dir, args.out, args.force)
    latest = report.versions[-1] if report.versions else "-"
    print(
        f"backed up {config.state_dir} to {out}: {len(report.versions)} versions on disk (latest "
        f"{latest}), {len(report.pruned)} pruned, {report.files} files, {report.bytes / 1e6:.1f} MB; "
        "restore by pointing state_dir at it"
    )
    for old in removed:
        print(f"removed the older backup {old} (--keep {args.keep})")
    return 0


def _size(nbytes: float) -> str:
    """``nbytes`` in B, kB, MB or GB (powers of 1000), three significant figures or so."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def _revocations(config: AggregatorConfig) -> RevocationList | None:
    """The configured CRL for ``status``, or None (said once when it does not load)."""
    if config.tls.crl is None:
        return None
    try:
        return RevocationList.load(config.tls.crl, config.tls.ca)
    except RevocationError as exc:
        print(f"(revocation state unknown: {exc})")
        return None


def _certificate_state(cert: AgentCertificate, revocations: RevocationList | None) -> str:
    """``certificate <serial> ends <date> (N days)`` and REVOKED / expired where it is."""
    if cert.not_after is None:
        return "certificate not recorded (joined before this release)"
    days = (cert.not_after - time.time()) / 86400
    ends = time.strftime("%Y-%m-%d %H:%M", time.gmtime(cert.not_after))
    state = f"expired {-days:.0f} days ago" if days < 0 else f"{days:.0f} days left"
    revoked = cert.revocation(revocations) if revocations is not None else None
    if revoked is not None:
        state += f"; REVOKED: {revoked.describe()}"
    return f"certificate {cert.serial_hex[:16]} ends {ends} UTC ({state})"


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="cloudfed-aggregator", description=__doc__)
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("CLOUDFED_CONFIG"),
        help="TOML config (or $CLOUDFED_CONFIG); env vars CLOUDFED_<FIELD> override it",
    )
    p.add_argument("--init-from", type=Path, help="seed version 0 from this adapter if the state is empty")
    sub = p.add_subparsers(dest="command", metavar="{run,status,export,backup}")
    sub.add_parser("run", help="run the daemon (the default)")
    sub.add_parser("status", help="print the federation's state")
    out = sub.add_parser(
        "export",
        help="write a global version as a peft LoRA adapter directory (and merged weights with --merge)",
    )
    out.add_argument(
        "--out", type=Path, required=True, help="directory to write (replaced whole with --force)"
    )
    out.add_argument(
        "--version",
        default="best",
        help="a version number, latest, or best (default: the lowest token-weighted eval loss of the "
        "versions compared over the same agents; averaged over neighbouring versions when noised)",
    )
    out.add_argument(
        "--merge", action="store_true", help="also write merged/: the base model with the adapter folded in"
    )
    out.add_argument(
        "--base",
        help="base model path or hub id for --merge and adapter_config.json (default: federation.model_id)",
    )
    out.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    copy = sub.add_parser("backup", help="copy the state directory consistently, also while the daemon runs")
    where = copy.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="directory to write (--force: replace it)")
    where.add_argument("--into", type=Path, help="write backup-<UTC time> in this directory (timers, cron)")
    copy.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    copy.add_argument("--keep", type=int, default=7, help="with --into: the newest backups kept there (7)")
    args = p.parse_args(argv)
    try:
        config = load(AggregatorConfig, args.config).validate()
        if args.command == "status":
            return status(config)
        if args.command == "export":
            return export(config, args)
        if args.command == "backup":
            return backup(config, args)
        setup_logging(config.log_level, config.log_format, "aggregator")
        log.info("%s", set_torch_threads(config.cpu_threads).describe())
        seed(config, args.init_from)
        asyncio.run(serve(config))
    except CloudfedError as exc:
        print(f"cloudfed-aggregator: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
