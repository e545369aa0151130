"""Dynamic batching: images from concurrent requests share one forward pass.

Requests ``submit`` their preprocessed images; one asyncio task collects them into batches of at
most ``max_batch_size``, waiting at most ``max_delay`` seconds after the oldest waiting image for
more to arrive (Triton's ``max_queue_delay``, LitServe's ``batch_timeout``), and runs each batch
on a single model thread, so the event loop keeps accepting requests while the model computes and
the images that arrive meanwhile form the next batch.

The queue is bounded: an image that would make it longer than ``max_queue``, or wait longer than
``max_wait`` at the model's recent speed, is refused at once (``QueueFull``, which the server
answers with 503 and ``Retry-After``), so memory stays bounded however many clients push, and a
slow model sheds load with a 503 rather than accepting requests it would answer only after their
timeout. A request that stops waiting (its timeout, a closed connection) leaves
its images in the queue marked cancelled; they are dropped when a batch is assembled.

Admission guesses; the queue checks again. A request may carry a ``deadline`` (its timeout, on
``time.monotonic``); when a batch is assembled, an image whose deadline falls before the batch could
end (at the recent speed) is refused with ``QueueFull`` too, before any compute is spent on it: on a
machine that slowed down after admission, the requests that can no longer be answered in time get a
503 to retry instead of a 504 after their timeout, and the batch's time goes to those that still can.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch


class QueueFull(Exception):
    """The queue cannot take the request's images now; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Item:
    pixels: torch.Tensor  # [3, S, S]
    future: asyncio.Future
    deadline: float = math.inf  # time.monotonic() by which the request wants its answer
    arrived: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Batches ``[3, S, S]`` images for ``run_batch([B, 3, S, S]) -> [B, ...]`` (called on one thread).

    ``on_batch(size, seconds)``, ``on_depth(queued)`` and ``on_shed()`` (an image refused at batch time)
    report to the metrics.
    """

    def __init__(
        self,
        run_batch: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch_size: int,
        max_delay: float,
        max_queue: int,
        max_wait: float = math.inf,
        on_batch: Callable[[int, float], None] = lambda size, seconds: None,
        on_depth: Callable[[int], None] = lambda queued: None,
        on_shed: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size, self.max_delay, self.max_queue = max_batch_size, max_delay, max_queue
        self.max_wait = max_wait
        self.on_batch, self.on_depth, self.on_shed = on_batch, on_depth, on_shed
        # One thread runs the model: batches never compete with each other for the cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cvt-model")
        self._items: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._images_per_second = 0.0  # recent speed (moving average over batches); 0 before the first

    @property
    def queued(self) -> int:
        return len(self._items)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="cvt-batcher")

    async def stop(self) -> None:
        """Stop after the batch in progress; images still queued get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._items:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._items.clear()
        self.executor.shutdown(wait=True)

    async def submit(self, pixels: torch.Tensor, deadline: float = math.inf) -> torch.Tensor:
        """Queue a ``[n, 3, S, S]`` request and wait for its ``[n, ...]`` outputs, in order.

        ``deadline`` (``time.monotonic()``): refuse the images (``QueueFull``) rather than start them
        in a batch that would end after it.
        """
        n = pixels.shape[0]
        if self.queued + n > self.max_queue or self.expected_wait(n) > self.max_wait:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        items = [_Item(image, loop.create_future(), deadline) for image in pixels]
        self._items.extend(items)
        self.on_depth(self.queued)
        self._wakeup.set()
        try:
            return torch.stack(await asyncio.gather(*(item.future for item in items)))
        finally:
            for item in items:  # a request that stopped waiting: its images are skipped
                item.future.cancel()

    async def warm_up(self, pixels: torch.Tensor) -> None:
        """Run one batch before serving: the first pass pays one-time costs, and its speed is the
        estimate ``expected_wait`` starts from (else a burst at start-up is accepted unmeasured)."""
        started = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, pixels)
        self._record_speed(pixels.shape[0], time.perf_counter() - started)

    def _record_speed(self, images: int, seconds: float) -> None:
        speed = images / max(seconds, 1e-6)
        # Smoothed: one batch slowed by another process must not swing admission either way.
        self._images_per_second = speed if not self._images_per_second else 0.7 * self._images_per_second + 0.3 * speed

    def expected_wait(self, n: int = 1) -> float:
        """Seconds until ``n`` more images would be done, at the recent speed; 0 before any batch ran."""
        if not self._images_per_second:
            return 0.0
        return (self.queued + n) / self._images_per_second

    def retry_after(self) -> int:
        """Whole seconds (at least 1) the model needs for the queue, at the last batch's speed."""
        return max(1, math.ceil(self.queued / (self._images_per_second or 1.0)))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            pixels = torch.stack([item.pixels for item in batch])
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self.executor, self.run_batch, pixels)
            except Exception as exc:  # a failed batch fails its requests, never the batcher
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            seconds = time.perf_counter() - started
            self._record_speed(len(batch), seconds)
            self.on_batch(len(batch), seconds)
            for item, row in zip(batch, outputs):
                if not item.future.done():
                    item.future.set_result(row)

    async def _next_batch(self) -> list[_Item]:
        """Wait for the first image, then for more until the batch is full or the oldest has waited
        ``max_delay``; cancelled images are dropped."""
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._items[0].arrived + self.max_delay
        while len(self._items) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch = []
        # A full batch at the recent speed (0 before any ran): an image due before it ends is refused now.
        ends = time.monotonic() + (self.max_batch_size / self._images_per_second if self._images_per_second else 0.0)
        while self._items and len(batch) < self.max_batch_size:
            item = self._items.popleft()
            if item.future.done():
                continue
            if item.deadline < ends:
                item.future.set_exception(QueueFull(self.retry_after()))
                self.on_shed()
            else:
                batch.append(item)
        self.on_depth(self.queued)
        return batch
