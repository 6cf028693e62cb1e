"""A loopback TCP relay that can cut its connections after a byte budget.

Used to break real TLS connections mid-stream (the bytes pass through
untouched). Bound to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    """Relays 127.0.0.1:<port> to a target port; cuts once ``cut_after`` client bytes passed."""

    def __init__(self, target_port: int, cut_after: int | None = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        budget = [self.cut_after]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counted: bool) -> None:
            try:
                while data := await src.read(65536):
                    if counted and budget[0] is not None:
                        if len(data) >= budget[0]:
                            self.cuts += 1
                            self.cut_after = None  # later connections pass freely
                            raise ConnectionResetError("cut")
                        budget[0] -= len(data)
                    dst.write(data)
                    await dst.drain()
            finally:
                for w in (writer, up_writer):
                    w.transport.abort()

        await asyncio.gather(
            pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
