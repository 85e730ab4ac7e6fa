"""Per-model admission and dynamic batching, on the server's asyncio loop.

A request is admitted (or refused with 503) before its body is decoded, so waiting work
is bounded by `max_queue` whatever the clients send; at most `max_concurrency` batches
run at once, in a thread pool of that size (the backends release the GIL). A worker
takes the oldest request and, for up to `max_delay_ms`, adds later ones of the same
tensor shapes until `max_batch` rows; it waits only while other admitted requests are
still being decoded, so a lone request never waits. The rows of a batch go to the graph
together, and each request gets its own rows back. Closing refuses new work and waits for admitted
work to finish (graceful shutdown).
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class QueueFull(Exception):
    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Ticket:
    """One admitted request; its place in the queue is given back when it starts running
    or when it leaves (a decode error, a client that went away)."""

    def __init__(self, owner):
        self.owner, self.held = owner, True

    def release(self):
        if self.held:
            self.held = False
            self.owner.waiting -= 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class _Admission:
    def __init__(self, name: str, max_queue: int):
        self.name, self.max_queue = name, max_queue
        self.waiting, self.running, self.closing = 0, 0, False

    def admit(self) -> Ticket:
        if self.closing:
            raise QueueFull(f"model '{self.name}' is shutting down", retry_after=5)
        if self.waiting >= self.max_queue:
            raise QueueFull(f"model '{self.name}' has {self.waiting} requests waiting (the limit); try again shortly")
        self.waiting += 1
        return Ticket(self)

    async def drain(self, poll: float = 0.02):
        self.closing = True
        while self.waiting or self.running:
            await asyncio.sleep(poll)


class Slots(_Admission):
    """Admission + a concurrency limit without batching (LLM generation: llama.cpp
    answers one request at a time)."""

    def __init__(self, name: str, max_queue: int, max_concurrency: int = 1):
        super().__init__(name, max_queue)
        self.sem = asyncio.Semaphore(max_concurrency)

    async def acquire(self, ticket: Ticket) -> None:
        await self.sem.acquire()
        ticket.release()
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self.sem.release()


class _Item:
    __slots__ = ("feeds", "future", "key", "rows", "ticket")

    def __init__(self, feeds: dict, loop, ticket: Ticket):
        self.feeds, self.ticket = feeds, ticket
        self.rows = len(next(iter(feeds.values())))
        self.key = tuple((k, v.dtype.str, v.shape[1:]) for k, v in sorted(feeds.items()))
        self.future = loop.create_future()


class Batcher(_Admission):
    def __init__(self, name: str, run, max_batch: int, max_delay_ms: float, max_queue: int,
                 max_concurrency: int, merge: bool = True, on_batch=None):
        super().__init__(name, max_queue)
        self.run, self.max_batch, self.delay = run, max_batch, max_delay_ms / 1000.0
        self.merge, self.on_batch = merge, on_batch
        self.concurrency = max_concurrency
        self.pending: collections.deque[_Item] = collections.deque()
        self.executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix=f"omedge-{name}")
        self.arrived = asyncio.Event()
        self.workers = [asyncio.get_running_loop().create_task(self._worker()) for _ in range(max_concurrency)]

    async def submit(self, ticket: Ticket, feeds: dict) -> dict:
        """The graph outputs for these feeds (their rows only)."""
        item = _Item(feeds, asyncio.get_running_loop(), ticket)
        self.pending.append(item)
        self.arrived.set()
        try:
            return await item.future
        except asyncio.CancelledError:   # the client went away: drop it if it has not started
            if item in self.pending:
                self.pending.remove(item)
            raise

    async def _take(self) -> list[_Item]:
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        batch = [self.pending.popleft()]
        rows, deadline = batch[0].rows, time.monotonic() + self.delay
        while self.merge and rows < self.max_batch:
            for item in [i for i in self.pending if i.key == batch[0].key]:
                if rows + item.rows > self.max_batch:
                    break
                self.pending.remove(item)
                batch.append(item)
                rows += item.rows
            left = deadline - time.monotonic()
            coming = self.waiting - len(batch) - len(self.pending)   # admitted, still being decoded
            if rows >= self.max_batch or left <= 0 or coming <= 0:
                break   # nobody else can join: do not make a lone request wait
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                pass
        return batch

    async def _worker(self):
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            for item in batch:
                item.ticket.release()
            self.running += 1
            try:
                feeds = batch[0].feeds if len(batch) == 1 else \
                    {k: np.concatenate([i.feeds[k] for i in batch]) for k in batch[0].feeds}
                if self.on_batch:
                    self.on_batch(sum(i.rows for i in batch))
                outputs = await loop.run_in_executor(self.executor, self.run, feeds)
                _split(batch, outputs)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request, which reports it
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
            finally:
                self.running -= 1

    async def close(self):
        await self.drain()
        for w in self.workers:
            w.cancel()
        self.executor.shutdown(wait=True)


def _split(batch: list[_Item], outputs: dict) -> None:
    if len(batch) == 1:
        if not batch[0].future.done():
            batch[0].future.set_result(outputs)
        return
    total, start = sum(i.rows for i in batch), 0
    for item in batch:
        part = {k: v[start:start + item.rows] if len(v) == total else v for k, v in outputs.items()}
        start += item.rows
        if not item.future.done():
            item.future.set_result(part)
