"""The fast path: CvT on oneDNN's GEMM on the CPU, as one layer on top of the plain model.

``model.py`` is the reference model (``nn.Linear``, a plain ``Mlp``); this module makes it fast,
can be taken off again, and is the only module of torchcvt that names private torch APIs
(``torch.ops.mkldnn._linear_pointwise``, ``torch._C._len_torch_dispatch_stack``).

* ``apply_fast_path(model)`` swaps, in place, every plain ``nn.Linear`` for ``OneDNNLinear`` and
  every ``Mlp`` for ``OneDNNMlp``: same parameters, same state dict, same numbers (fp32 rounding
  aside), training included. ``remove_fast_path(model)`` swaps them back. ``create_model`` and
  ``load_model`` return fast models; a ``CvT(...)`` built directly is the plain model.
* ``onednn_linear_epilogue`` runs a linear with its activation or residual add in one oneDNN call;
  ``fused.py`` builds the fused inference copy on it.

Why: PyTorch sends fp32 CPU matrix products to MKL; on some CPUs oneDNN's GEMM (also in PyTorch)
is about twice as fast (AVX-512 Zen 5: 2.2x), on others MKL is faster (AVX2 Zen 3: oneDNN 0.9x on
CvT's shapes; docs/performance.md). ``gemm_engine()`` times both on CvT's linear shapes once per CPU,
torch version and thread count (1.7 s with 2 threads on a Zen 3; kept in ``measurements.json``;
``$TORCHCVT_GEMM=onednn|mkl`` overrides it). With ``"mkl"`` the layers here run ``F.linear``.
The private op is probed once, at first use; where a torch version lacks it (or it computes
something else), and under compile, export, autocast and dispatch modes (FLOP counters, fake
tensors), every layer here runs plain ``F.linear``, which all of those understand.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .machine import read_record, record_key, time_alternating, update_record
from .model import Attention, Block, CvT, Mlp

logger = logging.getLogger("torchcvt")

# ------------------------------------------------------------ private torch APIs (only here)
# activation -> oneDNN post-op name and algorithm ("none": GELU with erf, exact like F.gelu).
_POST_OPS = {"none": ("none", ""), "gelu": ("gelu", "none"), "silu": ("swish", "")}
_DISPATCH_STACK_LENGTH = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _linear_pointwise(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> torch.Tensor:
    """``activation(F.linear(x2d, weight, bias))`` in one oneDNN call (2-D input)."""
    attr, algorithm = _POST_OPS[activation]
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, attr, [], algorithm)


def _linear_add(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual2d: torch.Tensor) -> torch.Tensor:
    """``F.linear(x2d, weight, bias) + residual2d`` in one oneDNN call."""
    return torch.ops.mkldnn._linear_pointwise.binary(x2d, residual2d, weight, bias, "add")


def onednn_linear_epilogue(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, epilogue: str,
                           residual2d: torch.Tensor | None = None) -> torch.Tensor:
    """One oneDNN call (2-D inputs): ``F.linear`` then the epilogue, ``"none"``, ``"gelu"``, ``"silu"``
    or ``"add"`` (of ``residual2d``)."""
    if epilogue == "add":
        return _linear_add(x2d, weight, bias, residual2d)
    return _linear_pointwise(x2d, weight, bias, epilogue)


def _dispatch_mode_active() -> bool:
    """A Python dispatch mode (FLOP counter, fake tensors) is on, or this torch cannot tell."""
    return _DISPATCH_STACK_LENGTH is None or _DISPATCH_STACK_LENGTH() > 0


@functools.cache
def onednn_available() -> bool:
    """Whether this torch has the oneDNN ops used here and they compute what ``F.linear`` does.

    Probed once, on tiny fixed inputs (no random numbers drawn), the first time a layer asks in
    plain eager mode; any failure means "no": the layers then run ``F.linear``.
    """
    if not torch.backends.mkldnn.is_available() or _DISPATCH_STACK_LENGTH is None:
        return False
    try:
        with torch.no_grad():
            x = torch.linspace(-2, 2, 12).view(3, 4)
            w = torch.linspace(-1, 1, 20).view(5, 4)
            b = torch.linspace(-0.5, 0.5, 5)
            r = torch.linspace(0, 1, 15).view(3, 5)
            ref = F.linear(x, w, b)
            pairs = [
                (_linear_pointwise(x, w, b), ref),
                (_linear_pointwise(x, w, None), F.linear(x, w)),
                (_linear_pointwise(x, w, b, "gelu"), F.gelu(ref)),
                (_linear_pointwise(x, w, b, "silu"), F.silu(ref)),
                (_linear_add(x, w, b, r), ref + r),
            ]
            return all(torch.allclose(ours, theirs, atol=1e-5) for ours, theirs in pairs)
    except Exception:  # a missing op, a changed signature: either way, do not use it
        return False


def use_onednn(x: torch.Tensor) -> bool:
    """Whether to run a linear on oneDNN: fp32 CPU tensors in plain eager mode, the op available."""
    return (
        not torch.compiler.is_compiling()  # first: under torch.compile the rest is not even traced
        and not torch.compiler.is_exporting()
        and not torch.onnx.is_in_onnx_export()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not _dispatch_mode_active()
        and onednn_available()  # the probe runs in plain eager mode only
        and gemm_engine() == "onednn"  # last: the measurement too
    )


# --------------------------------------------------------------- which GEMM is faster on this CPU
GEMM_ENGINES = ("onednn", "mkl")
# The choice is timed on CvT-13's linears at batch 4: (tokens, in, out, how many a forward has; k/v: 1/4 the tokens).
_TIMED_SHAPES = (
    (12544, 64, 64, 2), (3136, 64, 64, 2), (12544, 64, 256, 1), (12544, 256, 64, 1),
    (3136, 192, 192, 4), (784, 192, 192, 4), (3136, 192, 768, 2), (3136, 768, 192, 2),
    (788, 384, 384, 20), (200, 384, 384, 20), (788, 384, 1536, 10), (788, 1536, 384, 10),
)


def time_gemm_engines(rounds: int = 3) -> dict[str, float]:
    """Seconds per forward's worth of CvT-13 linears (``_TIMED_SHAPES``) on MKL and on oneDNN, timed alternately."""
    generator = torch.Generator().manual_seed(0)  # not the global generator: training's random stream stays as it is
    operands = [shape for n, k, m, count in _TIMED_SHAPES  # the same tensors as often as a forward has the shape
                for shape in [(torch.rand(n, k, generator=generator), torch.rand(m, k, generator=generator), torch.rand(m, generator=generator))] * count]

    def run(linear) -> None:
        for x, w, b in operands:
            linear(x, w, b)

    with torch.inference_mode():
        times = time_alternating({"mkl": lambda: run(F.linear), "onednn": lambda: run(_linear_pointwise)}, repeats=rounds)
    return {name: round(statistics.median(t), 5) for name, t in times.items()}


def gemm_override() -> str | None:
    """``$TORCHCVT_GEMM`` if set, else None; any other value than ``GEMM_ENGINES`` is a ConfigError."""
    forced = os.environ.get("TORCHCVT_GEMM") or None
    if forced is not None and forced not in GEMM_ENGINES:
        raise ConfigError(f"TORCHCVT_GEMM={forced!r}: expected one of {', '.join(GEMM_ENGINES)}")
    return forced


@functools.cache
def _measured_gemm_engine(threads: int) -> str:
    key, description = record_key({"linears": "cvt-13 at batch 4"}, threads)
    record = read_record(key) or {}
    if not isinstance(record.get("gemm_seconds"), dict) or set(record["gemm_seconds"]) != set(GEMM_ENGINES):
        logger.info("fast path: timing MKL against oneDNN once for this CPU and %d threads (seconds)", threads)
        record = {"gemm_seconds": time_gemm_engines()}
        update_record(key, description, record)  # not under load, nor in a read-only cache: used now either way
    seconds = record["gemm_seconds"]
    engine = "onednn" if seconds["onednn"] < seconds["mkl"] else "mkl"  # a tie goes to MKL, PyTorch's default
    logger.info("fast path: linears on %s (%d threads: MKL %.0f ms, oneDNN %.0f ms for CvT-13's linears)",
                engine, threads, 1e3 * seconds["mkl"], 1e3 * seconds["onednn"])
    return engine


def gemm_engine() -> str:
    """``"onednn"`` or ``"mkl"``: ``$TORCHCVT_GEMM``, else the faster measured for this CPU and thread count."""
    forced = gemm_override()
    if forced is not None or not onednn_available():
        return forced or "mkl"
    return _measured_gemm_engine(torch.get_num_threads())


def onednn_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x2d, weight, bias)`` on oneDNN's GEMM (2-D fp32 CPU tensors); ``F.linear`` without the op."""
    return _linear_pointwise(x2d, weight, bias) if onednn_available() else F.linear(x2d, weight, bias)


# ------------------------------------------------------------------------- training and eval
def _weight_grad(grad: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``grad^T @ x2d``: a linear's weight gradient ``[out, in]`` from ``grad [N, out]`` and ``x2d [N, in]``.

    oneDNN copies a transposed input to make it dense, so the narrower of the two is the one transposed.
    """
    if grad.shape[1] > x2d.shape[1]:
        return _linear_pointwise(x2d.t(), grad.t(), None).t()  # ([in, N] @ [N, out])^T
    return _linear_pointwise(grad.t(), x2d.t(), None)  # [out, N] @ [N, in]


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` on 2-D inputs with the forward and both backward products on oneDNN."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _linear_pointwise(x2d, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear_pointwise(grad, weight.t(), None)  # [N, out] @ [out, in]
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x2d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class _OneDNNMlpFunction(torch.autograd.Function):
    """``fc2(act(fc1(x)))`` on 2-D inputs that saves ``x`` and ``fc1(x)`` only.

    The activation's output, as large as ``fc1(x)``, is recomputed in backward (one elementwise
    pass) instead of being kept: a fifth less activation memory in a CvT training step.
    """

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, act: nn.Module) -> torch.Tensor:
        h = _linear_pointwise(x2d, w1, b1)  # [N, hidden]
        ctx.save_for_backward(x2d, h, w1, w2)
        ctx.act = act
        return _linear_pointwise(act(h), w2, b2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2d, h, w1, w2 = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            a = ctx.act(h)
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if need_w2:
            grad_w2 = _weight_grad(grad, a.detach())
        if need_b2:
            grad_b2 = grad.sum(0)
        if need_x or need_w1 or need_b1:
            (grad_h,) = torch.autograd.grad(a, h, _linear_pointwise(grad, w2.t(), None))  # [N, hidden]
            if need_x:
                grad_x = _linear_pointwise(grad_h, w1.t(), None)
            if need_w1:
                grad_w1 = _weight_grad(grad_h, x2d)
            if need_b1:
                grad_b1 = grad_h.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def _requires_grad(x: torch.Tensor, *params: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same numbers) whose products run on oneDNN where it is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_onednn(x) or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(-1, x.shape[-1])  # [N, in]: oneDNN's linear takes 2-D inputs
        if _requires_grad(x, self.weight):
            out = _OneDNNLinearFunction.apply(x2d, self.weight, self.bias)
        else:
            out = _linear_pointwise(x2d, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fusable_linear(module: nn.Module) -> bool:
    """A linear with a bias and no hooks, plain or ours: safe to run through its parameters directly."""
    return type(module) in (nn.Linear, OneDNNLinear) and module.bias is not None and not _has_hooks(module)


class OneDNNMlp(Mlp):
    """``Mlp`` (same children, same numbers) that runs fc1 -> act -> fc2 as one oneDNN unit.

    It fuses where the activation is the only thing between fc1 and fc2 (no live dropout) and both
    linears are plain and unhooked (a LoRA or hooked layer takes ``Mlp``'s module path). In
    training the activation is recomputed in backward; in inference GELU runs inside fc1's GEMM.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if not (
            use_onednn(x) and _fusable_linear(fc1) and _fusable_linear(fc2) and fc1.weight.dtype == torch.float32
            and (self.drop.p == 0.0 or not self.training)
        ):
            return super().forward(x)
        x2d = x.reshape(-1, x.shape[-1])  # [N, dim]
        if _requires_grad(x, fc1.weight, fc2.weight):
            out = _OneDNNMlpFunction.apply(x2d, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.act)
        elif isinstance(self.act, nn.GELU) and self.act.approximate == "none":  # GELU (erf) fused into fc1's GEMM
            out = _linear_pointwise(_linear_pointwise(x2d, fc1.weight, fc1.bias, "gelu"), fc2.weight, fc2.bias)
        else:
            out = _linear_pointwise(self.act(_linear_pointwise(x2d, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        return out.view(*x.shape[:-1], fc2.out_features)


# The swap changes a module's class only (as torch.nn.utils.parametrize does): parameters, buffers,
# hooks, the state dict and an optimizer's references to the parameters stay exactly as they are.
_FAST = {nn.Linear: OneDNNLinear, Mlp: OneDNNMlp}
_PLAIN = {fast: plain for plain, fast in _FAST.items()}


def apply_fast_path(model: nn.Module) -> nn.Module:
    """Make ``model`` fast in place: every plain ``nn.Linear`` -> ``OneDNNLinear``, ``Mlp`` -> ``OneDNNMlp``.

    Only exact classes are swapped: subclasses (LoRA, quantized or parametrized linears) and
    linears with forward hooks are left alone. Idempotent; returns ``model``.
    """
    for module in model.modules():
        if type(module) in _FAST and not (type(module) is nn.Linear and _has_hooks(module)):
            module.__class__ = _FAST[type(module)]
    return model


def remove_fast_path(model: nn.Module) -> nn.Module:
    """Undo ``apply_fast_path`` in place: the plain ``nn.Linear`` and ``Mlp`` classes again. Returns ``model``."""
    for module in model.modules():
        if type(module) in _PLAIN:
            module.__class__ = _PLAIN[type(module)]
    return model
