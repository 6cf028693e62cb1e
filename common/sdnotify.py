"""systemd's notify protocol over $NOTIFY_SOCKET (READY, RELOADING, STOPPING, WATCHDOG), no library needed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; False (and nothing sent) when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(states).encode())
    return True


def reloading() -> bool:
    """RELOADING=1 with the monotonic timestamp systemd 253+ expects (older ones ignore it)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when no watchdog is set for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


async def watchdog_loop(stop: asyncio.Event) -> None:
    """WATCHDOG=1 at half of WatchdogSec while the event loop is alive; returns at once without a watchdog."""
    interval = watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
