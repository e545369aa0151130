"""Where every random draw of a training run comes from, and how a resumed run draws the same.

Every random draw comes from a stream seeded by what it belongs to, never by how the work was
split: an image's augmentation by ``(seed, epoch, index)`` (the same whatever the number of
DataLoader workers or processes: ``SeededSamples``), the data order by ``(seed, epoch)``
(``epoch_batches``) and mixup/drop path by ``(seed, step, rank)``. So a resumed run redraws exactly
what the killed run would have drawn, and with ``use_deterministic_algorithms()`` on the CPU ends
bit-identical to a run never killed. Checkpoints still store every RNG state (``rng_state``:
python, numpy, torch, CUDA) and resume restores them (``set_rng_state``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1

# Stream tags, the first value of every stream seed, so that sample, order and step streams never share a seed.
SAMPLE, ORDER, STEP = 1, 2, 3


def stream_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser per value): neighbouring inputs such as
    consecutive image indices get unrelated random streams."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def seed_everything(seed: int, *, cuda: bool = True) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's (also every CUDA device, unless not ``cuda``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)
    else:  # the same CPU stream; torch.manual_seed also queues a CUDA seeding with its stack trace (~5 ms)
        torch.default_generator.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (kernels without one raise); no cuDNN autotuning."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class SeededSamples(Dataset):
    """``dataset[(epoch, index)]``: the item, with python/numpy/torch seeded by ``(seed, epoch, index)``
    first, so its random augmentation does not depend on the worker or the process that loads it.
    ``dataset[(epoch, index, draw)]`` (class-balanced sampling, where an image can be drawn twice in an
    epoch): seeded by ``(seed, epoch, index, draw)``, so each draw is augmented anew."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...]):
        epoch, index, *draw = key
        seed_everything(stream_seed(SAMPLE, self.seed, epoch, index, *draw), cuda=False)  # augmentation runs on the CPU
        return self.dataset[index]


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """Each sample's drawing weight, 1 / (images of its class): every class is drawn equally often."""
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    counts = torch.bincount(labels_t)
    return 1.0 / counts[labels_t].double()


def epoch_batches(
    num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    accum_steps: int = 1, start_step: int = 0, sample_weights: torch.Tensor | None = None,
) -> list[list[tuple[int, ...]]]:
    """This rank's micro-batches of ``(epoch, index)`` for one epoch, from optimizer step ``start_step``.

    A permutation seeded by ``(seed, epoch)`` is cut into global batches of ``batch_size`` (the
    incomplete last one dropped); rank r takes the r-th of ``world_size`` equal shares of each, cut
    into ``accum_steps`` micro-batches. Concatenating all ranks' shares gives back the 1-process
    batch, whatever ``world_size``: resuming on another number of processes keeps the order.

    ``sample_weights`` (``class_balanced_weights``): instead of a permutation, ``num_samples`` draws
    with replacement in proportion to the weights, from the same ``(seed, epoch)`` stream, so all of
    the above still holds; each entry is then ``(epoch, index, draw)``, ``draw`` its place in the epoch.
    """
    g = torch.Generator().manual_seed(stream_seed(ORDER, seed, epoch))
    if sample_weights is None:
        order = [(epoch, i) for i in torch.randperm(num_samples, generator=g).tolist()]
    else:
        drawn = torch.multinomial(sample_weights, num_samples, replacement=True, generator=g).tolist()
        order = [(epoch, i, draw) for draw, i in enumerate(drawn)]
    share = batch_size // world_size
    micro = share // accum_steps
    batches = []
    for step in range(start_step, num_samples // batch_size):
        mine = order[step * batch_size + rank * share: step * batch_size + (rank + 1) * share]
        batches += [mine[m * micro:(m + 1) * micro] for m in range(accum_steps)]
    return batches


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
