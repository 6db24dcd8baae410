"""The one asyncio helper the agent's loops share."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event | None, seconds: float) -> None:
    """Return when any of ``events`` is set or ``seconds`` pass (None is skipped)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        if waiters:
            await asyncio.wait(
                waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await asyncio.sleep(max(0.0, seconds))
    finally:
        for w in waiters:
            w.cancel()
