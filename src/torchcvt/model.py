"""CvT: Introducing Convolutions to Vision Transformers (Wu et al. 2021, arXiv 2103.15808).

Exact to the official microsoft/CvT ``lib/models/cls_cvt.py``, read top to bottom: layers, blocks,
the stage, the model. Where the official code has bugs we fix them without changing the numbers
it computes on valid input: batch size 1 keeps its batch dimension (the official code squeezes it
away) and the ``linear`` projection works (the official code never defines q/k/v for it).

This is the plain reference model, built from ``nn.Linear`` and a plain ``Mlp``. ``create_model``
and ``load_model`` (pretrained.py) return it with the CPU fast path applied (fastpath.py: the same
parameters and numbers, the linears on oneDNN's GEMM); a ``CvT(...)`` built directly is plain.

Shape legend: B batch, C channels, H x W the token grid of the stage, T = H*W (+1 with a cls token).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CvTConfig
from .errors import ConfigError


# ------------------------------------------------------------------------------------------ layers
class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation the official CvT weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples (timm's DropPath)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * mask.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, act: str, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ConvProjection(nn.Sequential):
    """The convolutional part of a q/k/v projection, on a ``[B, C, H, W]`` map.

    ``dw_bn``: depthwise conv (no bias) then BatchNorm; ``avg``: average pooling; ``linear``: nothing
    (an empty Sequential, the identity: the tokens go straight to the linear projection).
    """

    def __init__(self, dim: int, method: str, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        if method == "dw_bn":
            self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, bias=False, groups=dim)
            self.bn = nn.BatchNorm2d(dim)
        elif method == "avg":
            self.avg = nn.AvgPool2d(kernel_size, stride, padding, ceil_mode=True)


class Attention(nn.Module):
    """Convolutional projection attention.

    q/k/v = Linear(ConvProjection(x)) on the spatial tokens, k/v usually with stride 2; a cls token
    bypasses the convolutions and is prepended to each of q, k, v. The scale is
    ``embed_dim ** -0.5`` over the whole width, not per head, as in the official code.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool,
        method: str,
        kernel_size: int,
        stride_q: int,
        stride_kv: int,
        padding_q: int,
        padding_kv: int,
        with_cls_token: bool,
        attn_drop: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = dim**-0.5
        self.with_cls_token = with_cls_token
        self.attn_drop = attn_drop
        # Official: with "avg" pooling the query gets no convolutional projection.
        self.conv_proj_q = ConvProjection(dim, "linear" if method == "avg" else method, kernel_size, stride_q, padding_q)
        self.conv_proj_k = ConvProjection(dim, method, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = ConvProjection(dim, method, kernel_size, stride_kv, padding_kv)
        self.proj_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, heads, T, C/heads]

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, T, C = x.shape
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, H * W], dim=1)  # [B, 1, C], [B, H*W, C]
        # The tokens seen as a map: a channels-last view, no copy. The convolutions keep channels-last,
        # so their outputs flatten back to contiguous tokens without a copy either.
        fmap = x.unflatten(1, (H, W)).permute(0, 3, 1, 2)  # [B, C, H, W], channels-last strides
        # each projection: [B, C, h', w'] -> [B, h'*w', C]
        q = self.conv_proj_q(fmap).flatten(2).transpose(1, 2)
        k = self.conv_proj_k(fmap).flatten(2).transpose(1, 2)
        v = self.conv_proj_v(fmap).flatten(2).transpose(1, 2)
        if self.with_cls_token:
            q = torch.cat((cls_token, q), dim=1)
            k = torch.cat((cls_token, k), dim=1)
            v = torch.cat((cls_token, v), dim=1)
        q, k, v = self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), self._heads(self.proj_v(v))
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # [B, heads, Tq, C/heads]
        x = x.transpose(1, 2).reshape(B, -1, C)  # [B, Tq, C]
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; drop path applies to each residual branch only."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, act: str, eps: float, drop: float, drop_path: float, **attn_kwargs: Any) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, proj_drop=drop, **attn_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Convolutional token embedding: a strided conv, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int, eps: float) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # [B, C, H, W]
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W  # [B, H*W, C]


class Stage(nn.Module):
    """One CvT stage: embedding, optional cls token, ``depth`` blocks; returns a map and the cls token."""

    def __init__(self, config: CvTConfig, index: int, in_chans: int) -> None:
        super().__init__()
        c, i = config, index
        dim = c.embed_dim[i]
        self.patch_embed = ConvEmbed(in_chans, dim, c.patch_sizes[i], c.patch_stride[i], c.patch_padding[i], c.layer_norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if c.cls_token[i] else None
        self.pos_drop = nn.Dropout(c.drop_rate[i])
        # Stochastic depth rises linearly from 0 to the stage's rate (per stage, as the official code).
        rates = torch.linspace(0, c.drop_path_rate[i], c.depth[i], device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(
            Block(
                dim, c.num_heads[i], mlp_ratio=c.mlp_ratio[i], act=c.hidden_act, eps=c.layer_norm_eps,
                drop=c.drop_rate[i], drop_path=rates[j], qkv_bias=c.qkv_bias[i],
                method=c.qkv_projection_method[i], kernel_size=c.kernel_qkv[i],
                stride_q=c.stride_q[i], stride_kv=c.stride_kv[i], padding_q=c.padding_q[i],
                padding_kv=c.padding_kv[i], with_cls_token=c.cls_token[i], attn_drop=c.attention_drop_rate[i],
            )
            for j in range(c.depth[i])
        )
        self.grad_checkpointing = False  # CvT.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, H, W = self.patch_embed(x)  # [B, H*W, C]
        B, _, C = x.shape
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # [B, 1 + H*W, C]
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Keep only the block's input; its activations are recomputed in backward.
                x = checkpoint(block, x, H, W, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), _batchnorm_stats_kept(b)))
            else:
                x = block(x, H, W)
        cls_token = None
        if self.cls_token is not None:
            cls_token, x = torch.split(x, [1, H * W], dim=1)
        # A channels-last view of the tokens: no copy, and the next stage's embedding conv reads it as is.
        return x.unflatten(1, (H, W)).permute(0, 3, 1, 2), cls_token  # [B, C, H, W], [B, 1, C] | None


@contextlib.contextmanager
def _batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Recomputing a checkpointed block in backward runs its BatchNorms in training mode a second
    time; their running statistics must move once per step, as without checkpointing."""
    norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.training and m.track_running_stats]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


# ------------------------------------------------------------------------------------------- model
class FeatureInfo:
    """What each stage's map is, as timm's ``FeatureInfo``: channels, reduction (stride) and module name.

    ``channels()``, ``reduction()``, ``module_name()`` answer for ``out_indices`` (all stages unless a
    features-only model selected some), or for the stage(s) ``idx``. Indexing, ``len`` and iteration
    see the per-stage dicts (``num_chs``, ``reduction``, ``module``), as the list it replaces.
    """

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int] | None = None) -> None:
        self.info = [dict(entry) for entry in info]
        self.out_indices = tuple(range(len(self.info)) if out_indices is None else out_indices)

    def from_other(self, out_indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def get_dicts(self, idx: int | Sequence[int] | None = None) -> list[dict[str, Any]]:
        return [self.info[i] for i in (self.out_indices if idx is None else idx)]

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo({self.info}, out_indices={self.out_indices})"


def check_input(config: CvTConfig, x: torch.Tensor) -> None:
    """Raise a one-line error for inputs a model of ``config`` cannot take."""
    c = config.num_channels
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"CvT expects a torch.Tensor [B, {c}, H, W], got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"CvT expects a 4-D input [B, {c}, H, W], got shape {list(x.shape)}")
    if x.shape[1] != c:
        raise ValueError(f"CvT expects {c} input channels, got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"CvT expects a floating-point input (normalised pixels), got {x.dtype}")
    try:
        config.feature_sizes(int(x.shape[2]), int(x.shape[3]))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


class CvT(nn.Module):
    """The Convolutional Vision Transformer.

    ``CvT(224, 3, 1000)`` builds CvT-13 (image_size, in_chans, num_classes; CvTConfig's defaults);
    ``CvT(config=CvTConfig(...))`` any layout. ``in_chans`` is timm's name for what the config (and
    transformers' config.json) calls ``num_channels``. Models by name, with or without weights, come from
    ``torchcvt.create_model`` (pretrained.py); this file does no I/O. ``model(x)`` maps ``[B, C, H, W]`` images of any
    size to logits ``[B, num_classes]`` (features ``[B, embed_dim[-1]]`` when num_classes is 0).
    ``global_pool`` (CvTConfig's field) says what the classifier reads: ``"token"`` the last stage's
    cls token (the official model, with one), ``"avg"`` the mean of the last stage's tokens (the
    official model without a cls token), ``""`` every token, unpooled.
    """

    def __init__(
        self,
        image_size: int | None = None,
        in_chans: int | None = None,
        num_classes: int | None = None,
        *,
        config: CvTConfig | None = None,
    ) -> None:
        super().__init__()
        if config is None:
            config = CvTConfig()  # CvT-13
        overrides = {k: v for k, v in (("image_size", image_size), ("num_channels", in_chans), ("num_classes", num_classes)) if v is not None}
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.num_classes = config.num_classes
        self.num_features = config.num_features

        in_chans = config.num_channels
        self.stages = nn.ModuleList()
        for i in range(config.num_stages):
            self.stages.append(Stage(config, i, in_chans))
            in_chans = config.embed_dim[i]
        self.norm = nn.LayerNorm(self.num_features, eps=config.layer_norm_eps)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes > 0 else nn.Identity()
        self.feature_info = FeatureInfo(
            [dict(num_chs=config.embed_dim[i], reduction=r, module=f"stages.{i}") for i, r in enumerate(config.reductions())]
        )
        self.init_weights()

    # ---------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """The official 'trunc_norm' initialisation.

        Inside the stages: Linear weights truncated-normal (std 0.02) with zero bias, norms at 1/0,
        convolutions at PyTorch's default, cls tokens truncated-normal. The head: weight
        truncated-normal, bias at PyTorch's default, as microsoft/CvT does.
        """
        for m in self.stages.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)

    # ------------------------------------------------------------------------------ timm-style API
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases: the cls tokens."""
        return {f"stages.{i}.cls_token" for i, s in enumerate(self.stages) if s.cls_token is not None}

    def get_classifier(self) -> nn.Module:
        return self.head

    @property
    def global_pool(self) -> str:
        """The pooling in effect: "token", "avg" or "" (``config.global_pool``, or the official choice)."""
        return self.config.pool

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (torch.utils.checkpoint
        per block): much less activation memory in training for about one more forward pass of compute."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, *, id2label: dict[int, str] | None = None) -> None:
        """Replace the head with a freshly initialised one (0: no head), optionally with another pooling
        (timm's signature). The config follows."""
        changes: dict[str, Any] = {"num_classes": num_classes, "id2label": id2label}
        if global_pool is not None:
            changes["global_pool"] = global_pool
        self.config = self.config.replace(**changes)
        self.num_classes = num_classes
        device, dtype = self.norm.weight.device, self.norm.weight.dtype
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line error for inputs the model cannot take."""
        check_input(self.config, x)

    def _run_stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not torch.compiler.is_compiling():
            self.check_input(x)
        cls_token = None
        for stage in self.stages:
            x, cls_token = stage(x)
        return x, cls_token

    def _final_tokens(self, x: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
        # The tokens the classifier reads (global_pool): the cls token, the spatial tokens, or all of them.
        pool = self.config.pool
        if pool == "token":
            return self.norm(cls_token)  # [B, 1, C]
        tokens = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if pool == "" and cls_token is not None:
            tokens = torch.cat((cls_token, tokens), dim=1)  # [B, 1 + H*W, C]
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens the head reads: ``[B, 1, C]`` (global_pool "token": the cls token),
        ``[B, H*W, C]`` ("avg"), every token ``[B, (1 +) H*W, C]`` ("")."""
        x, cls_token = self._run_stages(x)
        return self._final_tokens(x, cls_token)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens of ``forward_features`` (mean; a no-op on a lone cls token; none for
        global_pool "") and classify: ``[B, num_classes]`` (``[B, T, num_classes]`` unpooled)."""
        if self.config.pool != "":
            x = x.mean(dim=1)  # [B, C]
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        return_cls_token: bool = False,
        intermediates_only: bool = False,
        stop_early: bool = False,
    ):
        """Raw per-stage outputs ``[B, C, H, W]`` (before the final norm, as transformers' hidden_states).

        The maps are contiguous (NCHW), what convolutional necks and ``.view`` expect: inside the model
        they are channels-last views of the tokens (stage 2's not even that: a slice past its cls
        token), and only the returned ones are copied.

        ``indices``: stage indices to return (an int n: the last n stages; None: all). With
        ``return_cls_token`` each entry is a ``(map, cls_token or None)`` pair. Returns the list, or
        ``(final_tokens, list)`` unless ``intermediates_only``; ``stop_early`` skips later stages
        when only intermediates are wanted.
        """
        n = len(self.stages)
        if indices is None:
            keep = list(range(n))
        elif isinstance(indices, int):
            keep = list(range(n - indices, n))
        else:
            keep = [i % n for i in indices]
        if stop_early and intermediates_only:
            # Run only as far as the last stage asked for.
            last = max(keep)
            stages = self.stages[: last + 1]
        else:
            stages = self.stages
        if not torch.compiler.is_compiling():
            self.check_input(x)
        outputs, cls_token = [], None
        for i, stage in enumerate(stages):
            x, cls_token = stage(x)
            if i in keep:
                outputs.append((x.contiguous(), cls_token) if return_cls_token else x.contiguous())
        if intermediates_only:
            return outputs
        return self._final_tokens(x, cls_token), outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
