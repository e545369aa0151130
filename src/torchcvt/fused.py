"""Inference fusions: an eval-only CvT copy whose blocks do fewer, larger kernels.

``fuse_for_inference(model)`` folds BatchNorm into the convolutional projections and the attention
scale into q, merges projections that read the same input, and runs each linear with what follows it
(GELU/SiLU, the residual add) in one oneDNN call where oneDNN is this CPU's faster GEMM
(``fastpath.gemm_engine``), else ``F.linear`` with the epilogue in place. The
embedding convolutions keep channels-last weights, so every convolution reads and writes channels-last
maps and the tokens come out of them without a copy. A layer of the fast path (``fastpath.py``): the
plain model (``model.py``) stays the reference, and the copy's logits match it within 1e-4.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .fastpath import apply_fast_path, onednn_linear_epilogue, use_onednn
from .model import Attention, Block, CvT, Mlp

# x * sigmoid(1.702 x) = silu(1.702 x) / 1.702: fc1 is scaled up and fc2 down by this factor.
_QUICK_GELU_ALPHA = 1.702


class FusedLinear(nn.Module):
    """A frozen linear with an optional fused activation (``"gelu"``, ``"silu"``) and residual add."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none") -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous().clone())
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if use_onednn(x):
            x2d = x.reshape(-1, x.shape[-1])  # [N, C_in]: oneDNN's linear takes 2-D inputs
            if residual is None:
                out = onednn_linear_epilogue(x2d, self.weight, self.bias, self.activation)
            else:
                out = onednn_linear_epilogue(x2d, self.weight, self.bias, "add", residual.reshape(x2d.shape[0], -1))
            return out.view(*x.shape[:-1], self.weight.shape[0])
        out = F.linear(x, self.weight, self.bias)
        # In place on the fresh product when nothing records it (no autograd, no tracing): one
        # allocation instead of three per block, 4-8 % of a CvT-13 forward on MKL (docs/performance.md).
        in_place = not torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                                                        or torch.onnx.is_in_onnx_export())
        if self.activation == "gelu":
            out = F.gelu(out)
        elif self.activation == "silu":
            out = F.silu(out, inplace=in_place)
        if residual is None:
            return out
        return out.add_(residual) if in_place and out.dtype == residual.dtype else out + residual  # autocast: promote

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
                # Behind a cls token the view is not dense: one copy here, not one in each convolution.
                fmap = fmap.contiguous(memory_format=torch.channels_last)
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
    """Inference MLP: fc1 with its activation, then fc2 with the residual add (``FusedLinear``)."""

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
            raise RuntimeError("a model from fuse_for_inference is inference-only: train the original CvT")
        return super().train(False)


@torch.no_grad()
def fuse_for_inference(model: CvT) -> CvT:
    """A copy of ``model`` for fast inference: same logits within 1e-4, eval-only.

    The copy keeps CvT's methods (``forward``, ``forward_features``, ``forward_intermediates``,
    ``forward_head``); its blocks are fused (see the module docstring), the rest of it (embeddings,
    head) gets the fast path. Its state dict is not a checkpoint: save the original model.
    While exporting or compiling the fused layers run portable ATen ops
    (``F.linear``, ``F.gelu``, adds), so the copy also exports to ONNX and torch.export.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"fuse_for_inference expects a torchcvt CvT, got {type(model).__name__}")
    opt = copy.deepcopy(model).eval()
    config = model.config
    for i, stage in enumerate(opt.stages):
        stage.blocks = nn.ModuleList(FusedBlock(b, config.qkv_projection_method[i], config.hidden_act) for b in stage.blocks)
        # Channels-last weights make the convolution write channels-last maps, so its tokens
        # (flatten + transpose) need no copy, and the weight is not converted on every call.
        conv = stage.patch_embed.proj
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return apply_fast_path(opt).requires_grad_(False)
