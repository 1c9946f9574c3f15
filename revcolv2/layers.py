"""The layers RevColV2 is built from, as ``timm.layers`` holds timm's: patch embedding,
position embedding, attention, window ops, the MLP, the cross-column fusion, the bf16
LayerNorm helpers, the fused residual + drop-path update, level maps and the MIM hand-off;
and the plumbing ``revcolv2.model`` needs for TorchScript (:class:`LevelFn`) and for
``RevColV2.compile_levels`` (:func:`allow_level_recompiles`).

timm's own layers are used where they do the job (``Mlp``); the others differ from timm's
for the reason given in their docstring's first line.
"""
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

__all__ = ["LEVEL_RECOMPILE_LIMIT", "Attention", "Fusion", "LevelFn", "LevelMap", "Mlp", "PatchEmbed",
           "allow_level_recompiles", "bf16_affines", "bf16_autocast_on", "bf16_layer_norm", "check_images", "hand_off",
           "residual_add", "sincos_pos_embed_2d", "window_partition", "window_unpartition"]


def sincos_pos_embed_2d(h: int, w: int, dim: int, device: Optional[torch.device] = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed 2-D sin-cos position embedding for an (h, w) token grid -> (1, h*w, dim)."""
    if dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64),
        torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    out_y = ys.reshape(-1, 1) * omega  # (N, D/4)
    out_x = xs.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.to(dtype).unsqueeze(0)


@torch.fx.wrap  # a call in fx graphs: the checks run on real shapes, not on traced ones
def check_images(x: Tensor, in_chans: int, patch_size: int) -> None:
    """Raise ``ValueError`` for anything but a (B, ``in_chans``, H, W) batch with H and W
    multiples of ``patch_size``. Written for torch.jit.script too (no tuple of unknown length)."""
    if x.dim() != 4:
        raise ValueError("RevColV2 expects images of shape (B, C, H, W), got shape {}".format(list(x.shape)))
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    if c != in_chans:
        raise ValueError("RevColV2 was built for {} input channels, got {}".format(in_chans, c))
    if h % patch_size != 0 or w % patch_size != 0:
        raise ValueError(
            "input size {}x{} is not divisible by the patch size {}; resize or pad the image to a multiple of {}"
            .format(h, w, patch_size, patch_size)
        )


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; not timm's, whose errors do not name the fix and which
    returns no token grid (the position embedding and the windows need it for any input size)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        check_images(x, self.in_chans, self.patch_size)
        x = self.proj(x)  # (B, D, H/p, W/p)
        hw = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), hw


class Attention(nn.Module):
    """Multi-head self-attention with scaled_dot_product_attention; not timm's, whose q/k/v split
    of a permuted view makes its backward copy the qkv gradient once per block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # Split q, k, v along dim 2 of (B, N, 3, heads, d_head): the backward then stacks their
        # gradients straight into that layout, which is the qkv output's, so no copy is needed
        # to reshape the gradient back (unbinding a permuted view makes one copy per block).
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # (B, heads, N, d_head) -> (B, N, D)


def window_partition(x: Tensor, hw: Tuple[int, int], ws: int) -> Tuple[Tensor, Tuple[int, int]]:
    """(B, H*W, D) -> (B * num_windows, ws*ws, D), zero-padding H and W up to multiples of ws
    (timm's takes (B, H, W, C) maps and no padding)."""
    b, _, d = x.shape
    h, w = hw
    x = x.view(b, h, w, d)
    pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // ws, ws, wp // ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, d), (hp, wp)


def window_unpartition(x: Tensor, ws: int, padded: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, ws*ws, D) -> (B, H*W, D)."""
    hp, wp = padded
    h, w = hw
    d = x.shape[-1]
    b = x.shape[0] // ((hp // ws) * (wp // ws))
    x = x.view(b, hp // ws, wp // ws, ws, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
    return x[:, :h, :w].reshape(b, h * w, d)


# LayerNorms under bf16 autocast. Under autocast a norm's output feeds a bf16 matmul. A
# float32 LayerNorm reads and writes float32 (8 bytes per element) and is then cast (6
# more); casting the float32 state first and normalising in bf16 moves 6 + 4, and the
# backward half the bytes. The kernel still accumulates the statistics in float32. fp16
# autocast keeps float32 norms: a state beyond fp16's range would overflow. These helpers
# are eager-only (TorchScript compiles the norms' own float32 path).
@torch.jit.unused
def bf16_autocast_on(x: Tensor) -> bool:
    """Whether ``x`` is a float32 column state under bf16 autocast (never while fx traces)."""
    if isinstance(x, torch.fx.Proxy) or x.dtype != torch.float32:
        return False
    dev = x.device.type
    return (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
            and torch.get_autocast_dtype(dev) == torch.bfloat16)


@torch.jit.unused
def bf16_affines(params: List[Tensor]) -> List[Tensor]:
    """``params`` (LayerNorm weights and biases) in bf16, cast by one concatenation and one
    cast for all of them (each small cast would cost a kernel launch), returned as views."""
    return list(torch.cat(params).to(torch.bfloat16).split([p.numel() for p in params]))


@torch.jit.unused
def bf16_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm of the float32 state ``x`` cast to bf16, with bf16 ``weight`` / ``bias``.
    Autocast is off around the call: CUDA autocast would run ``layer_norm`` in float32."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(weight.dtype), (x.shape[-1],), weight, bias, eps)


class _ScaledResidual(torch.autograd.Function):
    """``x + branch * scale`` with one kernel each way (see :func:`residual_add`)."""

    @staticmethod
    def forward(ctx, x: Tensor, branch: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        ctx.branch_dtype = branch.dtype
        return torch.addcmul(x, branch, scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        (scale,) = ctx.saved_tensors
        g_branch = None
        if ctx.needs_input_grad[1]:  # g * scale, computed in g's dtype and stored in the branch's
            g_branch = torch.mul(g, scale, out=torch.empty(g.shape, dtype=ctx.branch_dtype, device=g.device))
        return (g if ctx.needs_input_grad[0] else None), g_branch, None


def residual_add(x: Tensor, branch: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Residual update ``x + branch * scale``, ``scale`` (B,) the per-sample drop-path factors
    (0 or 1/keep_prob; None: ``x + branch``). Not timm's ``DropPath``: the factors are drawn
    outside, once per forward, so that the reversible engine's rebuild replays them.

    ``x`` is a float32 column state and ``branch`` the block's output in autocast's dtype. In
    eager mode the multiply and the add are one ``addcmul`` kernel, and the backward writes
    ``g * scale`` straight in the branch's dtype: one kernel instead of a multiply and a cast.
    Compiled or scripted, the same expression is left to the compiler to fuse.
    """
    if scale is None:
        return x + branch
    scale = scale.view(-1, 1, 1).to(x.dtype)  # the result keeps the state's dtype (a no-op in float32)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.addcmul(x, branch, scale)
    return _ScaledResidual.apply(x, branch, scale)


class Fusion(nn.Module):
    """Projects the cross-column input before it is added to the in-column input.

    ``linear``: LayerNorm + Linear (the reference design); ``add``: identity (no parameters).
    """

    def __init__(self, dim: int, variant: str = "linear"):
        super().__init__()
        if variant not in ("linear", "add"):
            raise ValueError(f"unknown fusion variant {variant!r}; expected 'linear' or 'add'")
        if variant == "linear":
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.proj = nn.Linear(dim, dim)
        self.variant = variant

    def forward(self, cross: Tensor) -> Tensor:
        if self.variant != "linear":
            return cross
        if not torch.jit.is_scripting() and bf16_autocast_on(cross):
            w = bf16_affines([self.norm.weight, self.norm.bias])
            return self.proj(bf16_layer_norm(cross, w[0], w[1], self.norm.eps))
        return self.proj(self.norm(cross))


class LevelMap(nn.Module):
    """(B, N, D) tokens of one level -> (B, D, H, W) map: a view, no copy, no parameters.

    One per level (``RevColV2.level_maps``): the named point where timm's ``feature_cls='hook'``
    and ``'fx'`` extractors read a level (``feature_info`` names it) and where
    ``RevColV2.forward_intermediates`` takes its maps.
    """

    def forward(self, tokens: Tensor, hw: Tuple[int, int]) -> Tensor:
        return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[2]).permute(0, 3, 1, 2)


def hand_off(t: Tensor, visible_ids: Tensor, fill: Tensor) -> Tensor:
    """MIM hand-off: visible tokens (B, Nv, D) scattered back to full length at ``visible_ids``
    (B, Nv); the holes take ``fill`` (B|1, N, D)."""
    b, _, d = t.shape
    full = fill.expand(b, -1, -1).to(t.dtype)
    return full.scatter(1, visible_ids.unsqueeze(-1).expand(-1, -1, d), t)


# torch.jit.script can index a ModuleList by a variable only through an interface type (used
# in Column.level_f when scripting). Declaring one warns that TorchScript is deprecated in
# torch 2.x; silenced, as importing the model should not warn about a tool it may never use.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)

    @torch.jit.interface
    class LevelFn(nn.Module):
        def forward(self, inp: Tensor, cross: Optional[Tensor], drop_scales: Optional[Tensor],
                    hw: Optional[Tuple[int, int]]) -> Tensor:
            pass


# graph variants of ``Level.forward`` that compile_levels() may need (see there)
LEVEL_RECOMPILE_LIMIT = 64


def allow_level_recompiles(limit: int = LEVEL_RECOMPILE_LIMIT) -> None:
    """Raise torch._dynamo's recompile limit (process-wide) to at least ``limit``, as
    ``RevColV2.compile_levels`` needs. Call it once, where the program starts."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
