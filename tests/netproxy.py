"""A loopback TCP relay that can cut its connections after a byte budget.

Used to break real TLS connections mid-stream (the bytes pass through
untouched). Bound to 127.0.0.1 only; each cut happens once, later
connections pass freely.
"""

from __future__ import annotations

import asyncio
import contextlib


class CuttingProxy:
    """Relays 127.0.0.1:<port> to a target port and cuts once ``cut_after`` bytes went ``direction``."""

    def __init__(self, target_port: int, cut_after: int | None = None, direction: str = "up") -> None:
        assert direction in ("up", "down")
        self.target_port = target_port
        self.cut_after = cut_after
        self.direction = direction
        self.cuts = 0
        self.bytes = {"up": 0, "down": 0}
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def bytes_up(self) -> int:
        """Bytes relayed client -> server."""
        return self.bytes["up"]

    @property
    def bytes_down(self) -> int:
        """Bytes relayed server -> client."""
        return self.bytes["down"]

    async def start(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        budget = [self.cut_after]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
            try:
                while data := await src.read(65536):
                    self.bytes[direction] += len(data)
                    if direction == self.direction and budget[0] is not None:
                        if len(data) >= budget[0]:
                            self.cuts += 1
                            self.cut_after = None
                            raise ConnectionResetError("cut")
                        budget[0] -= len(data)
                    dst.write(data)
                    await dst.drain()
            finally:
                for w in (writer, up_writer):
                    w.transport.abort()

        await asyncio.gather(
            pump(reader, up_writer, "up"), pump(up_reader, writer, "down"), return_exceptions=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
