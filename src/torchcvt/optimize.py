"""optimize_for_inference: the same logits (within 1e-4), computed faster on CPU.

What it does to a copy of the model, each change measured (docs/performance.md):

* BatchNorm folded into the depthwise q/k/v convolutions (they gain a bias);
* the attention scale folded into the query projection;
* projections that share their input become one linear: k and v after ``avg`` pooling, q, k
  and v with ``linear`` projections;
* every linear runs on oneDNN with its epilogue fused: GELU (QuickGELU through SiLU with
  rescaled weights) after ``fc1``, the residual add after ``attn.proj`` and ``fc2``.
  On CPUs where PyTorch's default fp32 GEMM (MKL) runs a generic code path, AMD's among them,
  oneDNN's is about twice as fast, at full fp32 precision;
* tokens stay ``[B, T, C]`` throughout; the depthwise convolutions read them as a
  channels-last map, so no transpose copies.

While exporting or compiling, the same module runs portable ATen ops (``F.linear``,
``F.gelu``, adds) instead of the oneDNN calls, so it also exports to ONNX and torch.export.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention, Block, CvT, Mlp
from .onednn import use_onednn

# x * sigmoid(1.702 x) = silu(1.702 x) / 1.702: fc1 is scaled up and fc2 down by this factor.
_QUICK_GELU_ALPHA = 1.702


# activation -> oneDNN post-op name and algorithm ("none": GELU with erf, exact like F.gelu).
_ONEDNN_ACTIVATIONS = {"gelu": ("gelu", "none"), "silu": ("swish", "")}


class FusedLinear(nn.Module):
    """A frozen linear with an optional fused activation (``"gelu"``, ``"silu"``) and residual add."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous().clone())
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape[:-1] + (self.weight.shape[0],)
        if use_onednn(x):
            x2d = x.reshape(-1, x.shape[-1])  # [N, C_in]: oneDNN's linear takes 2-D inputs
            if residual is not None:
                out = torch.ops.mkldnn._linear_pointwise.binary(x2d, residual.reshape(x2d.shape[0], -1), self.weight, self.bias, "add")
            elif self.activation == "none":
                out = torch.ops.mkldnn._linear_pointwise(x2d, self.weight, self.bias, "none", [], "")
            else:
                attr, algorithm = _ONEDNN_ACTIVATIONS[self.activation]
                out = torch.ops.mkldnn._linear_pointwise(x2d, self.weight, self.bias, attr, [], algorithm)
            return out.view(shape)
        out = F.linear(x, self.weight, self.bias)
        if self.activation == "gelu":
            out = F.gelu(out)
        elif self.activation == "silu":
            out = F.silu(out)
        return out if residual is None else out + residual

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, activation={self.activation}"


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (eval-mode BatchNorm), computed in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # [C]
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


class FusedAttention(nn.Module):
    """Convolutional projection attention: BatchNorm and scale folded, shared-input projections merged.

    Input: the norm1 tokens ``[B, T, C]`` and the residual stream ``[B, T, C]``; returns
    ``residual + attention(tokens)``.
    """

    def __init__(self, attn: Attention, method: str) -> None:
        super().__init__()
        C = attn.proj.in_features
        self.num_heads = attn.num_heads
        self.with_cls_token = attn.with_cls_token
        self.method = method
        scale = attn.scale
        wq, bq = attn.proj_q.weight * scale, None if attn.proj_q.bias is None else attn.proj_q.bias * scale
        wk, bk = attn.proj_k.weight, attn.proj_k.bias
        wv, bv = attn.proj_v.weight, attn.proj_v.bias

        def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)

        if method == "dw_bn":
            # k and v stay separate: a 2C-output grouped conv and a block-diagonal k/v linear both
            # measured slower than two convolutions and two linears (docs/performance.md).
            self.conv_q = self._folded_conv(attn.conv_proj_q.conv, attn.conv_proj_q.bn)
            self.conv_k = self._folded_conv(attn.conv_proj_k.conv, attn.conv_proj_k.bn)
            self.conv_v = self._folded_conv(attn.conv_proj_v.conv, attn.conv_proj_v.bn)
            self.q, self.k, self.v = FusedLinear(wq, bq), FusedLinear(wk, bk), FusedLinear(wv, bv)
        elif method == "avg":
            self.pool_kv = attn.conv_proj_k.avg
            self.q = FusedLinear(wq, bq)
            self.kv = FusedLinear(torch.cat((wk, wv)), cat(bk, bv))  # k and v pool the same map
        else:  # "linear": q, k and v all read the tokens themselves
            self.qkv = FusedLinear(torch.cat((wq, wk, wv)), cat(bq, bk, bv))
        self.proj = FusedLinear(attn.proj.weight, attn.proj.bias)

    @staticmethod
    def _folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups)
        fused.weight.data, fused.bias.data = _fold_bn(conv, bn)
        return fused.requires_grad_(False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, heads, T, C/heads]

    def forward(self, x: torch.Tensor, residual: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, T, C = x.shape
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, H * W], dim=1)  # [B, 1, C], [B, H*W, C]
        if self.method == "linear":
            tokens = torch.cat((cls_token, x), dim=1) if self.with_cls_token else x
            q, k, v = self.qkv(tokens).split(C, dim=-1)  # [B, T, C] each
        else:
            fmap = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # [B, C, H, W], channels-last view
            if self.method == "dw_bn":
                # each: [B, C, h', w'] channels-last -> [B, h'*w', C] contiguous, no copy
                q = self.conv_q(fmap).flatten(2).transpose(1, 2)
                k = self.conv_k(fmap).flatten(2).transpose(1, 2)
                v = self.conv_v(fmap).flatten(2).transpose(1, 2)
                if self.with_cls_token:
                    q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
                q, k, v = self.q(q), self.k(k), self.v(v)
            else:  # avg: no convolution for q; k and v pool the same map, so one linear makes both
                kv = self.pool_kv(fmap).flatten(2).transpose(1, 2)  # [B, h*w, C]
                q = x
                if self.with_cls_token:
                    q, kv = torch.cat((cls_token, q), dim=1), torch.cat((cls_token, kv), dim=1)
                q = self.q(q)
                k, v = self.kv(kv).split(C, dim=-1)  # [B, Tkv, C] each, strided views
        x = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), scale=1.0)
        x = x.transpose(1, 2).reshape(B, -1, C)  # [B, T, C]; the CPU kernel's output is already this layout
        return self.proj(x, residual)


class FusedMlp(nn.Module):
    """fc1 + activation in one oneDNN call, fc2 + the residual add in another."""

    def __init__(self, mlp: Mlp, act: str) -> None:
        super().__init__()
        if act == "quick_gelu":
            a = _QUICK_GELU_ALPHA
            self.fc1 = FusedLinear(mlp.fc1.weight * a, mlp.fc1.bias * a, "silu")
            self.fc2 = FusedLinear(mlp.fc2.weight / a, mlp.fc2.bias)
        else:
            self.fc1 = FusedLinear(mlp.fc1.weight, mlp.fc1.bias, "gelu")
            self.fc2 = FusedLinear(mlp.fc2.weight, mlp.fc2.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x), residual)


class FusedBlock(nn.Module):
    """Inference-only transformer block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``, fused."""

    def __init__(self, block: Block, method: str, act: str) -> None:
        super().__init__()
        self.norm1 = copy.deepcopy(block.norm1)
        self.attn = FusedAttention(block.attn, method)
        self.norm2 = copy.deepcopy(block.norm2)
        self.mlp = FusedMlp(block.mlp, act)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.attn(self.norm1(x), x, H, W)
        return self.mlp(self.norm2(x), x)

    def train(self, mode: bool = True) -> "FusedBlock":
        if mode:
            raise RuntimeError("a model from optimize_for_inference is inference-only: train the original CvT")
        return super().train(False)


@torch.no_grad()
def optimize_for_inference(model: CvT) -> CvT:
    """A copy of ``model`` for fast inference: same logits within 1e-4, eval-only.

    The copy keeps CvT's methods (``forward``, ``forward_features``, ``forward_intermediates``,
    ``forward_head``); its blocks are fused (see the module docstring), so its state dict is not a
    checkpoint: save the original model. ``torch.compile`` on top measured slower (its linears
    leave oneDNN; docs/performance.md), so it is not offered.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a torchcvt CvT, got {type(model).__name__}")
    opt = copy.deepcopy(model).eval()
    config = model.config
    for i, stage in enumerate(opt.stages):
        stage.blocks = nn.ModuleList(FusedBlock(b, config.qkv_projection_method[i], config.hidden_act) for b in stage.blocks)
    return opt.requires_grad_(False)
