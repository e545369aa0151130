"""Training on several processes: the process group and device of each, and BatchNorm over the global batch.

Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) ``setup_device`` joins the
process group (NCCL on CUDA, gloo on CPU) and picks ``cuda:LOCAL_RANK``; the trainer wraps its model
in DDP. The BatchNorms inside CvT's attention compute their statistics over the whole global batch
(``convert_batchnorm``): ``nn.SyncBatchNorm`` on GPUs, ``CrossRankBatchNorm2d`` on CPUs, where
SyncBatchNorm refuses to run. ``Dist.agree`` and ``Dist.on_main`` carry the loop's small decisions
(stop, checkpoint, a refusal of rank 0) over a CPU group, so they never wait for a GPU. With no per-rank randomness (no mixup, drop path or dropout) N
processes and one process therefore compute the same steps, up to float rounding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

from .errors import TorchCvTError

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    control: Any = field(default=None, repr=False, compare=False)  # process group for CPU messages (None: the default)

    @classmethod
    def from_env(cls) -> "Dist":
        """From the variables torchrun sets."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                   int(env.get("LOCAL_WORLD_SIZE", 1)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0, the process that logs and writes files."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced in place over all ranks (nothing to do in one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=op)
        return tensor

    def agree(self, values: list[int]) -> list[int]:
        """The maximum of each value over all ranks (on the CPU: no GPU sync)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return tensor.tolist()

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 alone, returned there (None on the other ranks); a TorchCvTError it raises
        is raised on every rank, so all of them stop with the same message."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except TorchCvTError as exc:
                error = exc
        if self.enabled:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=self.control)
            error = box[0]
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Wait for every rank, then leave the process group."""
        if self.enabled:
            dist.barrier()
            dist.destroy_process_group()


def setup_device(device: str | None = None) -> tuple[Dist, torch.device]:
    """The process group (from torchrun's environment) and this process's device: CUDA (the local
    rank's GPU) when available unless ``device`` is "cpu"."""
    d = Dist.from_env()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    target = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        # DDP compares gradient strides literally, and the depthwise kernels [C, 1, k, k] have a size-1
        # dimension whose stride is arbitrary: their contiguous gradients are reported as mismatched.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # CrossRankBatchNorm2d's all-reduce: torch 2.13 suggests its private functional collectives
        # instead, which compute the same sum with the same gradient (pyproject pins torch < 2.14).
        warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")
    if d.enabled and dist.get_backend() != "gloo":
        d.control = dist.new_group(backend="gloo")  # for agree/on_main: small messages on the CPU
    return d, target


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks, on CPUs (gloo).

    ``nn.SyncBatchNorm`` raises "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors;
    this computes the same thing with one differentiable all-reduce of per-channel sums (its
    gradient is again the sum over ranks: every rank's loss depends on every rank's statistics).
    Statistics are summed in float64, as the CPU BatchNorm kernel accumulates, so one process and N
    processes agree to float rounding. Evaluation mode uses the running statistics, as every BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([
            x.sum(dim=(0, 2, 3), dtype=torch.float64),
            x.double().square().sum(dim=(0, 2, 3)),
            x.new_full((1,), x.numel() // c, dtype=torch.float64),
        ])  # [2C + 1]: sums, sums of squares, element count per channel
        total = all_reduce(local)
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean.square()  # biased, used to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        scale = self.weight * torch.rsqrt(var.to(x.dtype) + self.eps)  # [C]
        shift = self.bias - mean.to(x.dtype) * scale
        return x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms whose statistics span all ranks: ``nn.SyncBatchNorm`` on GPUs, ours on CPUs."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(device))
        else:
            convert_batchnorm(child, device)
    return model
