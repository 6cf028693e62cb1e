"""Small asyncio helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Advance a blocking iterator (file reads) in a worker thread, one item at a time."""
    while True:
        item = await asyncio.to_thread(next, iterator, _END)
        if item is _END:
            return
        yield item  # type: ignore[misc]
