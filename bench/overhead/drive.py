"""Open-loop sending through ``EchoClient`` and reply collection; draining a backlog between phases."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

from tqdm import tqdm

from echolm.client import EchoClient, Reply

__all__ = ["drain", "drive"]


async def drive(
    client: EchoClient,
    prompts: list[str],
    *,
    rate: float | None,
    desc: str,
    max_new_tokens: int,
    timeout_s: float,
    max_inflight_sends: int = 64,
) -> tuple[list[Reply], float, float]:
    """Send every prompt (open loop at ``rate``, or as fast as sends allow when None); collect replies.

    Waits at most ``timeout_s`` after the last send. Returns the replies, the send duration and the
    time from the first send to the last reply (so replies/s holds even when some never came)."""
    ids: set[str] = set()
    replies: list[Reply] = []
    bar = tqdm(total=len(prompts), desc=desc, unit="reply", mininterval=1.0)
    done = asyncio.Event()
    last_reply = time.perf_counter()

    async def collect() -> None:
        nonlocal last_reply
        async for reply in client.replies():
            if reply.request_id in ids:
                replies.append(reply)
                last_reply = time.perf_counter()
                bar.update()
                if len(replies) == len(prompts):
                    done.set()
                    return

    collector = asyncio.create_task(collect())
    gate = asyncio.Semaphore(max_inflight_sends)

    async def send(prompt: str, request_id: str) -> None:
        try:
            await client.send(prompt, tenant="bench", request_id=request_id, max_new_tokens=max_new_tokens)
        finally:
            gate.release()

    start = time.perf_counter()
    sends = []
    for i, prompt in enumerate(prompts):
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await gate.acquire()
        request_id = uuid.uuid4().hex
        ids.add(request_id)
        sends.append(asyncio.create_task(send(prompt, request_id)))
    await asyncio.gather(*sends)
    send_s = time.perf_counter() - start
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), timeout_s)
    elapsed = max(last_reply - start, 1e-9) if replies else time.perf_counter() - start
    collector.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await collector
    bar.close()
    return replies, send_s, elapsed


async def drain(client: EchoClient, timeout_s: float) -> dict[str, float]:
    """Wait until every request sent so far is answered (a backlog would skew the next phase)."""
    began = time.perf_counter()
    backlog = client.outstanding
    while client.outstanding and time.perf_counter() - began < timeout_s:  # noqa: ASYNC110 - polls a counter
        await asyncio.sleep(0.2)
    return {"backlog": backlog, "left": client.outstanding, "waited_s": time.perf_counter() - began}
