"""cloudfed-agent: the agent's command line.

``check`` is a preflight an operator runs in each cloud: it validates the
config, connects to the aggregator with the agent's certificate, joins, prints
what the aggregator sees and the federation's settings, and downloads and
verifies the latest global adapter. ``run`` is the daemon: it trains the shared
LoRA adapter on local data every round and uploads the update.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import math
import os
import signal
import sys
from pathlib import Path

import grpc

from agent.distributed import DistContext
from common import sdnotify
from common.config import AgentConfig, load
from common.errors import CloudfedError
from common.logs import setup_logging


async def check(config: AgentConfig) -> int:
    """Join and download the latest version; print what was learned."""
    from agent.client import AggregatorClient
    from agent.privacy import announced, check_federation, describe
    from common.metrics import publish_validity

    async with AggregatorClient(
        config.aggregator, config.tls.files(), server_name=config.server_name, chunk_bytes=config.chunk_bytes
    ) as client:
        join = await client.join(num_examples=0, privacy=announced(config.privacy))  # checked there too
        s = join.settings
        print(f"identity        {join.agent_id}")
        validity = publish_validity(config.tls.files())
        days = (validity.not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400
        soon = validity.expiring()
        print(f"certificate     valid until {validity.not_after:%Y-%m-%d %H:%M} UTC ({days:.0f} days)")
        if soon is not None:
            print(f"                WARNING: {soon}")
        print(f"federation      {s.federation_id} (model {s.model_id or '-'})")
        print(f"codec           {s.codec.name}; secure aggregation {'on' if s.secagg.enabled else 'off'}")
        print(f"privacy         {describe(config.privacy, s)}")
        numel = sum(math.prod(p.shape) for p in s.layout.params)
        tensors, digest = len(s.layout.params), s.layout.digest[:16]
        print(f"layout          {tensors} tensors, {numel} parameters, digest {digest}")
        print(f"chunk limit     {s.chunk_limits.max_chunk_bytes} bytes")
        models = config.state_dir / "models"
        models.mkdir(parents=True, exist_ok=True)
        header = await client.download_model(
            models / f"v{join.global_version:08d}.safetensors", join.global_version
        )
        print(f"global version  {header.version}: {header.total_bytes} bytes, sha256 verified")
    check_federation(config.privacy, s)  # a refusal fails the preflight (exit 2), as `run` would
    return 0


async def run(config: AgentConfig, ctx: DistContext) -> int:
    """Rank 0 (or the only process): the daemon until SIGTERM/SIGINT or max_rounds."""
    from agent.daemon import Agent

    agent = Agent(config, ctx)
    if config.metrics_listen:
        from common.metrics import serve_metrics

        serve_metrics(config.metrics_listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    health = None
    if config.health_listen:
        from common.health import HealthPort

        health = HealthPort(config.health_listen)
        await health.start()
    watchdog = asyncio.create_task(sdnotify.watchdog_loop(stop))
    sdnotify.notify("READY=1", f"STATUS=agent for {config.aggregator}")
    try:
        await agent.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        stop.set()
        await watchdog
        if health is not None:
            await health.stop()
        await asyncio.to_thread(agent.stop_followers)
    return 0


def run_ranks(config: AgentConfig) -> int:
    """Under torchrun, rank 0 runs the daemon and the other ranks follow it; else just the daemon."""
    from agent.daemon import Worker
    from agent.distributed import init_from_env, shutdown
    from agent.trainer import pick_device

    ctx = init_from_env(pick_device(config.device))
    clean = False
    try:
        if ctx.is_leader:
            code = asyncio.run(run(config, ctx))
        else:
            Worker(config, ctx).follow()
            code = 0
        clean = True
        return code
    finally:
        shutdown(ctx, clean)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        prog="cloudfed-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("CLOUDFED_AGENT_CONFIG"),
        help="TOML config (or $CLOUDFED_AGENT_CONFIG); env vars CLOUDFED_AGENT_<FIELD> override it",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="connect, join and download the latest global version")
    run_cmd = sub.add_parser("run", help="run the agent daemon: train and upload every round")
    run_cmd.add_argument("--audit-dir", type=Path, help="keep a copy of every update sent, with its metadata")
    args = p.parse_args(argv)
    try:
        config = load(AgentConfig, args.config)
        if getattr(args, "audit_dir", None) is not None:
            config = dataclasses.replace(config, audit_dir=args.audit_dir.resolve())
        config = config.validate()
        setup_logging(config.log_level, config.log_format, "agent")
        return asyncio.run(check(config)) if args.cmd == "check" else run_ranks(config)
    except CloudfedError as exc:
        print(f"cloudfed-agent: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"cloudfed-agent: aggregator said {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
