"""The dynamic batcher alone (no HTTP): batch sizes, the bounded queue, cancelled and failed requests.

The reference is the arithmetic of the requests themselves: each output row must be its own
input's, whatever batch it travelled in.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from torchcvt.serve.batching import DynamicBatcher, QueueFull


def run(coroutine):
    return asyncio.run(coroutine)


class Model:
    """Records batch sizes; row i of the output is 2 * input row i, summed over its pixels."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.sizes.append(pixels.shape[0])
        return 2 * pixels.sum(dim=(1, 2, 3))


def images(*values: float) -> torch.Tensor:
    return torch.stack([torch.full((3, 2, 2), v) for v in values])


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay=0.05, max_queue=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(images(i)) for i in range(10)))
        await batcher.stop()
        return model.sizes, results

    sizes, results = run(main())
    assert sizes == [4, 4, 2]  # all ten were queued before the first batch was assembled
    assert [r.tolist() for r in results] == [[2 * 12 * i] for i in range(10)]


def test_a_multi_image_request_keeps_its_order():
    async def main():
        batcher = DynamicBatcher(Model(), max_batch_size=2, max_delay=0.0, max_queue=10)
        batcher.start()
        out = await batcher.submit(images(1, 2, 3, 4, 5))
        await batcher.stop()
        return out

    assert run(main()).tolist() == [24.0, 48.0, 72.0, 96.0, 120.0]


def test_a_full_queue_refuses_at_once():
    async def main():
        batcher = DynamicBatcher(Model(), max_batch_size=8, max_delay=10.0, max_queue=3)
        batcher.start()
        waiting = asyncio.ensure_future(batcher.submit(images(1, 2)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(images(3, 4))
        assert refused.value.retry_after >= 1
        await batcher.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting

    run(main())


def test_cancelled_requests_are_skipped_and_failures_reach_only_their_batch():
    async def main():
        calls = []

        def flaky(pixels):
            calls.append(pixels[:, 0, 0, 0].tolist())
            if 13.0 in calls[-1]:
                raise ValueError("bad batch")
            return pixels.sum(dim=(1, 2, 3))

        batcher = DynamicBatcher(flaky, max_batch_size=8, max_delay=0.2, max_queue=10)
        batcher.start()
        gone = asyncio.ensure_future(batcher.submit(images(7)))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(ValueError, match="bad batch"):
            await batcher.submit(images(13))
        after = await batcher.submit(images(1))
        await batcher.stop()
        return calls, after

    calls, after = run(main())
    assert calls == [[13.0], [1.0]]  # the cancelled image never reached the model
    assert after.tolist() == [12.0]


def test_images_that_would_wait_past_max_wait_are_refused():
    # The model takes at least 0.2 s per batch of one: at most 5 images/s (a loaded machine only
    # makes it slower, which makes the refusal more certain). Before any batch ran the speed is
    # unknown and nothing is refused for waiting; after one, 10 queued images would wait >= 2 s.
    def slow(pixels):
        time.sleep(0.2)
        return pixels.sum(dim=(1, 2, 3))

    async def main():
        batcher = DynamicBatcher(slow, max_batch_size=1, max_delay=0.0, max_queue=100, max_wait=1.0)
        batcher.start()
        first = await batcher.submit(images(1))
        assert batcher.expected_wait(10) >= 2.0
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(images(*range(10)))
        assert refused.value.retry_after >= 1
        await batcher.stop()
        return first

    assert run(main()).tolist() == [12.0]


def test_warm_up_runs_one_batch_and_seeds_the_speed_estimate():
    async def main():
        model = Model()
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay=0.0, max_queue=10)
        assert batcher.expected_wait(3) == 0.0  # unknown speed: nothing refused for waiting
        await batcher.warm_up(images(1, 2, 3, 4))
        wait = batcher.expected_wait(3)
        batcher.executor.shutdown()
        return model.sizes, wait

    sizes, wait = run(main())
    assert sizes == [4] and wait > 0.0


def test_images_due_before_their_batch_could_end_are_refused_without_compute():
    """A request whose deadline has passed when its batch is assembled gets QueueFull (a 503), and the
    model never sees it; one with time left is answered. Deadlines are in the past or far ahead, so no
    timing decides the outcome."""
    async def main():
        model = Model()
        shed = []
        batcher = DynamicBatcher(model, max_batch_size=4, max_delay=0.0, max_queue=100, on_shed=lambda: shed.append(1))
        await batcher.warm_up(images(0, 0, 0, 0))  # the speed estimate: a batch's end is now + a little
        batcher.start()
        late = asyncio.ensure_future(batcher.submit(images(5, 6), deadline=time.monotonic() - 1.0))
        fine = asyncio.ensure_future(batcher.submit(images(7), deadline=time.monotonic() + 3600.0))
        results = await asyncio.gather(late, fine, return_exceptions=True)
        await batcher.stop()
        return model.sizes, results, shed

    sizes, (late, fine), shed = run(main())
    assert isinstance(late, QueueFull) and late.retry_after >= 1
    assert fine.tolist() == [2 * 7 * 12]
    assert sizes == [4, 1] and len(shed) == 2  # the warm-up batch, then the one image with time left
