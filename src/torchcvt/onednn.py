"""oneDNN matrix products for CvT's linears on the CPU.

PyTorch sends fp32 CPU matrix products to MKL; on some CPUs (AMD's among them) oneDNN's GEMM,
also inside PyTorch, runs about twice as fast at the same fp32 precision (docs/performance.md).
``Linear`` is an ``nn.Linear`` (same parameters and state dict) whose forward and backward
products use oneDNN in eager fp32 CPU mode, and ``fused_mlp`` runs a whole MLP that way. Under
compile, export, autocast and dispatch modes everything falls back to ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def use_onednn(x: torch.Tensor) -> bool:
    """Whether to run a linear on oneDNN: fp32 CPU tensors in eager mode.

    PyTorch sends fp32 CPU matrix products to MKL, which on AMD CPUs runs a generic code path;
    oneDNN's GEMM, also part of PyTorch, is about twice as fast there at the same fp32 precision
    (measured on Zen 5, docs/performance.md; on Intel CPUs the two are expected to be close). Export, compilation, autocast and dispatch modes (FLOP
    counters, fake tensors) get plain ``F.linear``, which they understand.
    """
    return (
        not torch.compiler.is_compiling()  # first: under torch.compile the rest is not even traced
        and not torch.compiler.is_exporting()
        and not torch.onnx.is_in_onnx_export()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and not torch.is_autocast_enabled("cpu")
        and torch._C._len_torch_dispatch_stack() == 0
    )


def _onednn_linear(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


def _weight_grad(grad: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
    """``grad^T @ x2d``: a linear's weight gradient ``[out, in]`` from ``grad [N, out]`` and ``x2d [N, in]``.

    oneDNN copies a transposed input to make it dense, so the narrower of the two is the one transposed.
    """
    if grad.shape[1] > x2d.shape[1]:
        return _onednn_linear(x2d.t(), grad.t(), None).t()  # ([in, N] @ [N, out])^T
    return _onednn_linear(grad.t(), x2d.t(), None)  # [out, N] @ [N, in]


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` on 2-D inputs with the forward and both backward products on oneDNN."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x2d, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2d, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)  # [N, out] @ [out, in]
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
        h = _onednn_linear(x2d, w1, b1)  # [N, hidden]
        ctx.save_for_backward(x2d, h, w1, w2)
        ctx.act = act
        return _onednn_linear(act(h), w2, b2)

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
            (grad_h,) = torch.autograd.grad(a, h, _onednn_linear(grad, w2.t(), None))  # [N, hidden]
            if need_x:
                grad_x = _onednn_linear(grad_h, w1.t(), None)
            if need_w1:
                grad_w1 = _weight_grad(grad_h, x2d)
            if need_b1:
                grad_b1 = grad_h.sum(0)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same numbers) whose products run on oneDNN where it is faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_onednn(x) or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(-1, x.shape[-1])  # [N, in]: oneDNN's linear takes 2-D inputs
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            out = _OneDNNLinearFunction.apply(x2d, self.weight, self.bias)
        else:
            out = _onednn_linear(x2d, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def _plain_linear(m: nn.Module) -> bool:
    """A torchcvt Linear with a bias and no hooks: safe to run through its parameters directly."""
    return type(m) is Linear and m.bias is not None and not (m._forward_hooks or m._forward_pre_hooks)


def fused_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``mlp.fc2(mlp.act(mlp.fc1(x)))`` on oneDNN, or None where the fused path does not apply.

    It needs the activation to be the only thing between fc1 and fc2 (no live dropout) and both
    linears to be ours and unhooked (a LoRA or hooked layer takes the module path). In training the
    activation is recomputed in backward; in inference GELU runs inside fc1's GEMM.
    """
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not (
        use_onednn(x) and fc1.weight.dtype == torch.float32 and _plain_linear(fc1) and _plain_linear(fc2)
        and (mlp.drop.p == 0.0 or not mlp.training)
    ):
        return None
    x2d = x.reshape(-1, x.shape[-1])  # [N, dim]
    if torch.is_grad_enabled() and (x.requires_grad or fc1.weight.requires_grad or fc2.weight.requires_grad):
        out = _OneDNNMlpFunction.apply(x2d, fc1.weight, fc1.bias, fc2.weight, fc2.bias, mlp.act)
    elif isinstance(mlp.act, nn.GELU):  # inference: GELU (erf) fused into fc1's GEMM
        h = torch.ops.mkldnn._linear_pointwise(x2d, fc1.weight, fc1.bias, "gelu", [], "none")
        out = _onednn_linear(h, fc2.weight, fc2.bias)
    else:
        out = _onednn_linear(mlp.act(_onednn_linear(x2d, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    return out.view(*x.shape[:-1], fc2.out_features)
