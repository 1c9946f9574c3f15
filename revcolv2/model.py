"""RevColV2: reversible bottom-up and top-down columns over ViT tokens.

Han, Cai, Zhang, "Exploring Disentangled Representations in Masked Image Modeling"
(NeurIPS 2023). The authors released no code; this file is our reconstruction, with every
choice that the paper does not fix recorded in ``docs/ARCHITECTURE.md``.

Structure (top-down composition):

    RevColV2
      patch_embed        16x16 conv -> (B, N, D), + fixed 2-D sin-cos position embedding
      columns[0 .. nb)   bottom-up (BU) columns, levels updated 0 -> L-1
      hand-off           MIM only: visible tokens scattered back, mask token at the holes
      columns[nb .. )    top-down (TD) columns, levels updated L-1 -> 0
      fc_norm + head     classification on the top level of the last TD column

A column updates level ``l`` as ``c_l = alpha_l * c_l(prev column) + F_l(in, cross)``, with
``in`` the level just updated in this column (the patch tokens for the first level in the
column's order) and ``cross`` the neighbouring level of the previous column (the level
above for BU, below for TD). ``F_l`` = fusion then the level's ViT blocks. The update is
invertible given ``in`` (see :meth:`Column.inverse`), which ``revcolv2.reversible`` uses
to train without storing activations.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .checkpoint import checkpoint_filter_fn
from .layer_decay import layer_id, num_layers
from .reversible import State, levels_to_run, run_plain, run_reversible

__all__ = ["RevColV2", "MODEL_CFGS", "create_revcolv2", "sincos_pos_embed_2d"]

# One source of truth for the presets (imported by timm registration, tools and the
# detectron2 configs). Sizes at 224x224 are measured by tools/model_stats.py.
MODEL_CFGS: Dict[str, dict] = {
    # a few M parameters, for tests and CPU demos
    "revcolv2_tiny": dict(embed_dim=192, num_heads=3, num_bu_columns=2, num_td_columns=1),
    # paper Table 5 (supplementary): 88M params, 19 GFLOPs
    "revcolv2_base": dict(embed_dim=768, num_heads=12, num_bu_columns=2, num_td_columns=1),
    # paper Table 5 (supplementary): 327M params, 67 GFLOPs
    "revcolv2_large": dict(embed_dim=1024, num_heads=16, num_bu_columns=4, num_td_columns=2),
}

ALPHA_MIN = 1e-3  # |alpha| is kept at least this large so the inverse stays well defined


def sincos_pos_embed_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
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


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection with clear errors for unusable inputs."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        if x.ndim != 4:
            raise ValueError(f"RevColV2 expects images of shape (B, C, H, W), got {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_chans:
            raise ValueError(f"RevColV2 was built for {self.in_chans} input channels, got {c}")
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"input size {h}x{w} is not divisible by the patch size {p}; "
                f"resize or pad the image to a multiple of {p}"
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2), (h // p, w // p)


class Attention(nn.Module):
    """Multi-head self-attention with scaled_dot_product_attention."""

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
    """(B, H*W, D) -> (B * num_windows, ws*ws, D), zero-padding H and W up to multiples of ws."""
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


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def bf16_norm_dtype(x: Tensor) -> Optional[torch.dtype]:
    """``torch.bfloat16`` when ``x`` is a float32 state under bf16 autocast, else None.

    The LayerNorms of the columns then normalise in bf16 (see :func:`layer_norm`). fp16
    autocast keeps float32 LayerNorms: a state beyond fp16's range would overflow there.
    """
    if torch.jit.is_scripting() or x.dtype != torch.float32:
        return None
    dev = x.device.type
    if not torch.amp.is_autocast_available(dev):  # the meta device, say
        return None
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return torch.bfloat16
    return None


def cast_affines(norms: Sequence[nn.LayerNorm], dtype: torch.dtype) -> List[Tuple[Tensor, Tensor]]:
    """The (weight, bias) of each LayerNorm in ``dtype``: one concatenation and one cast for
    all of them (small casts cost a launch each, not bytes), returned as views."""
    flat = torch.cat([t for norm in norms for t in (norm.weight, norm.bias)]).to(dtype)
    parts = flat.split([t.numel() for norm in norms for t in (norm.weight, norm.bias)])
    return [(parts[2 * i], parts[2 * i + 1]) for i in range(len(norms))]


def layer_norm(x: Tensor, norm: nn.LayerNorm, affine: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``norm(x)``, or with ``affine`` (its weight and bias cast by :func:`cast_affines`) in
    that dtype: the float32 state is cast first and the norm reads and writes bf16.

    Under autocast the output feeds a bf16 matmul either way. A float32 LayerNorm would read
    and write float32 (8 bytes per element) and then be cast (6 more); this reads and writes
    bf16 after the cast (4), and its backward moves half the bytes. The statistics are still
    accumulated in float32 by the kernel. Autocast is turned off around the call because
    CUDA autocast would run ``layer_norm`` in float32 again.
    """
    if affine is None:
        return norm(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.to(affine[0].dtype), norm.normalized_shape, affine[0], affine[1], norm.eps)


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
    (0 or 1/keep_prob; None: ``x + branch``).

    ``x`` is a float32 column state and ``branch`` the block's output in autocast's dtype. In
    eager mode the multiply and the add are one ``addcmul`` kernel, and the backward writes
    ``g * scale`` straight in the branch's dtype: one kernel instead of a multiply and a cast.
    Compiled or scripted, the same expression is left to the compiler to fuse.
    """
    if scale is None:
        return x + branch
    scale = scale.view(-1, 1, 1)
    if torch.jit.is_scripting() or torch.compiler.is_compiling():
        return torch.addcmul(x, branch, scale)
    return _ScaledResidual.apply(x, branch, scale)


class Block(nn.Module):
    """Pre-norm ViT block; global attention, or windowed attention when ``window_size > 0``.

    Windowed attention needs the token grid (``hw``); without it (masked MIM input, where
    only visible tokens exist) the block attends globally.
    Drop path is applied with externally drawn per-sample scales ``keep`` of shape (B, 2)
    (attention branch, MLP branch), so the reversible engine can replay them exactly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale_init: Optional[float] = None,
        window_size: int = 0,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale_init is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma1 = self.gamma2 = None

    def _attend(self, x: Tensor, hw: Optional[Tuple[int, int]]) -> Tensor:
        if self.window_size > 0 and hw is not None:
            windows, padded = window_partition(x, hw, self.window_size)
            return window_unpartition(self.attn(windows), self.window_size, padded, hw)
        return self.attn(x)

    def forward(self, x: Tensor, keep: Optional[Tensor] = None, hw: Optional[Tuple[int, int]] = None) -> Tensor:
        low = bf16_norm_dtype(x)
        affine1, affine2 = cast_affines((self.norm1, self.norm2), low) if low is not None else (None, None)
        a = self._attend(layer_norm(x, self.norm1, affine1), hw)
        if self.gamma1 is not None:
            a = a * self.gamma1
        x = residual_add(x, a, None if keep is None else keep[:, 0])
        m = self.mlp(layer_norm(x, self.norm2, affine2))
        if self.gamma2 is not None:
            m = m * self.gamma2
        return residual_add(x, m, None if keep is None else keep[:, 1])


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
        low = bf16_norm_dtype(cross)
        return self.proj(layer_norm(cross, self.norm, cast_affines((self.norm,), low)[0] if low is not None else None))


class Level(nn.Module):
    """F_l: fuse (in-column input, cross-column input), then run the level's blocks."""

    def __init__(self, blocks: Sequence[Block], dim: int, has_cross: bool, fusion: str):
        super().__init__()
        self.fusion = Fusion(dim, fusion) if has_cross else None
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, inp: Tensor, cross: Optional[Tensor], keep: Optional[Tensor], hw: Optional[Tuple[int, int]]
    ) -> Tensor:
        x = inp if self.fusion is None or cross is None else inp + self.fusion(cross)
        for b, block in enumerate(self.blocks):
            x = block(x, None if keep is None else keep[:, b], hw)
        return x


class Column(nn.Module):
    """One reversible column. ``direction`` 'up' updates levels 0 -> L-1, 'down' L-1 -> 0.

    The wiring of a column lives here and only here: :attr:`order` (update order),
    :meth:`in_level` (which level of this column feeds level ``l``; None: the source tokens)
    and :meth:`cross_level` (which level of the previous column feeds it). Forward,
    inversion and the reversible engine's backward all go through the per-level
    :meth:`step` (``c_l = alpha_l * c_l(prev) + F_l(in, cross)``) and its inverse
    :meth:`unstep`.

    ``keep`` (B, L * blocks_per_level, 2) holds drop-path scales in execution order.
    """

    def __init__(self, levels: Sequence[Level], direction: str, has_prev: bool, dim: int, alpha_init: float):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.direction = direction
        self.has_prev = has_prev
        n = len(levels)
        self.alphas = nn.Parameter(torch.full((n, dim), alpha_init)) if has_prev else None
        self.order = self.update_order(direction, n)
        self.blocks_per_level = len(levels[0].blocks)

    # ----------------------------------------------------------------- wiring
    @staticmethod
    def update_order(direction: str, num_levels: int) -> List[int]:
        """Levels in update order: 0 -> L-1 for 'up' (BU), L-1 -> 0 for 'down' (TD)."""
        return list(range(num_levels)) if direction == "up" else list(range(num_levels - 1, -1, -1))

    @staticmethod
    def cross_of(direction: str, l: int, num_levels: int, has_prev: bool) -> Optional[int]:
        """Level of the previous column fused into level ``l`` (above for BU, below for TD);
        None in a column without a previous one, or past the top / bottom level."""
        c = l + 1 if direction == "up" else l - 1
        return c if has_prev and 0 <= c < num_levels else None

    def in_level(self, l: int) -> Optional[int]:
        """Level of this column that feeds level ``l`` (None: the source tokens)."""
        i = self.order.index(l)
        return None if i == 0 else self.order[i - 1]

    def cross_level(self, l: int) -> Optional[int]:
        """Level of the previous column fused into level ``l`` (above for BU, below for TD)."""
        return self.cross_of(self.direction, l, len(self.levels), self.has_prev)

    # ----------------------------------------------------------------- one level
    def alpha_values(self) -> Tensor:
        """Every level's alpha (L, D), magnitude clamped to at least ALPHA_MIN, sign kept
        (+ALPHA_MIN at 0). A run computes them once per column and indexes a level's row."""
        return self.alphas.abs().clamp(min=ALPHA_MIN).copysign(self.alphas)

    def alpha(self, l: int) -> Tensor:
        """alpha_l, clamped as in :meth:`alpha_values`."""
        return self.alpha_values()[l]

    def _level_keep(self, keep: Optional[Tensor], l: int) -> Optional[Tensor]:
        if keep is None:
            return None
        pos = self.order.index(l) * self.blocks_per_level
        return keep[:, pos:pos + self.blocks_per_level]

    def level_f(self, l: int, inp: Tensor, cross: Optional[Tensor], keep: Optional[Tensor], hw) -> Tensor:
        """F_l(in, cross): fusion then the level's blocks."""
        return self.levels[l](inp, cross, self._level_keep(keep, l), hw)

    @staticmethod
    def step_from(f: Tensor, prev_l: Optional[Tensor], alpha: Optional[Tensor]) -> Tensor:
        """The update given F: ``alpha * prev + f`` (``f`` in the first column).

        One ``addcmul`` kernel instead of a multiply and an add: it reads ``f`` and ``prev``
        once and writes the new state once (the dtype follows the same promotion).
        """
        return f if prev_l is None else torch.addcmul(f, alpha, prev_l)

    def step(self, l: int, inp: Tensor, cross: Optional[Tensor], prev_l: Optional[Tensor],
             keep: Optional[Tensor], hw, alpha: Optional[Tensor] = None) -> Tensor:
        """New value of level ``l``: ``alpha_l * prev_l + F_l(inp, cross)`` (``alpha``: this
        level's row of :meth:`alpha_values`, computed here when not given)."""
        f = self.level_f(l, inp, cross, keep, hw)
        if prev_l is not None and alpha is None:
            alpha = self.alpha(l)
        return self.step_from(f, prev_l, alpha)

    @staticmethod
    def unstep(new_l: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
        """Inverse of :meth:`step` given F: ``prev_l = (new_l - f) / alpha_l``."""
        return (new_l - f) / alpha

    # ----------------------------------------------------------------- whole column
    def forward(self, source: Tensor, prev: Optional[State], keep: Optional[Tensor], hw,
                num_levels: Optional[int] = None) -> State:
        """Update the first ``num_levels`` levels of :attr:`order` (all by default); levels
        not run are None in the returned state."""
        if (prev is not None) != self.has_prev:
            raise RuntimeError("column called with a previous state that does not match has_prev")
        new: List[Optional[Tensor]] = [None] * len(self.levels)
        k = len(self.order) if num_levels is None else num_levels
        alphas = self.alpha_values() if prev is not None and k > 0 else None
        for l in self.order[:k]:
            in_l, c = self.in_level(l), self.cross_level(l)
            inp = source if in_l is None else new[in_l]
            new[l] = self.step(l, inp, None if c is None else prev[c], None if prev is None else prev[l], keep, hw,
                               None if alphas is None else alphas[l])
        return tuple(new)

    def inverse(self, source: Tensor, new: State, keep: Optional[Tensor], hw) -> State:
        """Recover the previous column's state: c_l(j-1) = (c_l(j) - F_l(in, cross)) / alpha_l."""
        prev: List[Optional[Tensor]] = [None] * len(self.levels)
        alphas = self.alpha_values()
        # Level l needs prev[cross(l)], so walk the levels against the update order.
        for l in reversed(self.order):
            in_l, c = self.in_level(l), self.cross_level(l)
            inp = source if in_l is None else new[in_l]
            f = self.level_f(l, inp, None if c is None else prev[c], keep, hw)
            prev[l] = self.unstep(new[l], f, alphas[l])
        return tuple(prev)


# graph variants of ``Level.forward`` that compile_levels() may need (see there)
LEVEL_RECOMPILE_LIMIT = 64


def allow_level_recompiles(limit: int = LEVEL_RECOMPILE_LIMIT) -> None:
    """Raise torch._dynamo's recompile limit (process-wide) to at least ``limit``, as
    :meth:`RevColV2.compile_levels` needs. Call it once, where the program starts."""
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)


def _check_global_pool(global_pool: str) -> str:
    """'avg': mean over tokens; '': no pooling (timm), the head runs on every token."""
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool must be 'avg' or '' (no pooling), got {global_pool!r}")
    return global_pool


class RevColV2(nn.Module):
    """RevColV2 backbone + classification head (timm-style interface).

    Args:
        num_levels: levels per column (4 in the paper's design).
        blocks_per_level: ViT blocks in each level's F_l.
        num_bu_columns / num_td_columns: bottom-up and top-down columns.
        fusion: 'linear' (LayerNorm + Linear on the cross-column input) or 'add'.
        window_size: >0 gives windowed attention to every block whose global index (execution
            order: column by column, levels in the column's update order) is not listed in
            ``global_attn_indexes``.
        reversible: train with the reversible engine (activations rebuilt in backward).
        head_init_scale: multiplies the initial classifier weights (0.001 in fine-tuning).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_levels: int = 4,
        blocks_per_level: int = 1,
        num_bu_columns: int = 2,
        num_td_columns: int = 1,
        fusion: str = "linear",
        drop_path_rate: float = 0.0,
        layer_scale_init: Optional[float] = None,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        alpha_init: float = 0.5,
        reversible: bool = True,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if num_bu_columns < 1 or num_td_columns < 0 or num_levels < 1 or blocks_per_level < 1:
            raise ValueError("need num_bu_columns >= 1, num_td_columns >= 0, num_levels >= 1, blocks_per_level >= 1")
        _check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.num_levels = num_levels
        self.blocks_per_level = blocks_per_level
        self.num_bu_columns = num_bu_columns
        self.num_td_columns = num_td_columns
        self.reversible = reversible
        # reversible training: the forward's last update keeps its graph instead of
        # rebuilding it at once in backward (revcolv2.reversible, keep_last_graph)
        self.keep_last_graph = True
        self.drop_path_rate = drop_path_rate

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)

        num_columns = num_bu_columns + num_td_columns
        self.blocks_per_column = num_levels * blocks_per_level
        total_blocks = num_columns * self.blocks_per_column
        global_set = set(global_attn_indexes)
        # stochastic depth grows linearly with execution depth (timm / MAE convention)
        self.register_buffer(
            "drop_rates", torch.linspace(0, drop_path_rate, total_blocks), persistent=False
        )
        columns = []
        for j in range(num_columns):
            direction = "up" if j < num_bu_columns else "down"
            levels: List[Optional[Level]] = [None] * num_levels
            for pos, l in enumerate(Column.update_order(direction, num_levels)):
                blocks = []
                for b in range(blocks_per_level):
                    g = j * self.blocks_per_column + pos * blocks_per_level + b
                    ws = 0 if g in global_set else window_size
                    blocks.append(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, ws))
                has_cross = Column.cross_of(direction, l, num_levels, has_prev=j > 0) is not None
                levels[l] = Level(blocks, embed_dim, has_cross, fusion)
            columns.append(Column(levels, direction, j > 0, embed_dim, alpha_init))
        self.columns = nn.ModuleList(columns)
        # timm feature metadata: the levels of the last column, all at the patch stride
        self.feature_info = [
            dict(module=f"columns.{num_columns - 1}.levels.{l}", num_chs=embed_dim, reduction=patch_size)
            for l in range(num_levels)
        ]

        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):  # MAE: init the patch projection like a Linear
            w = m.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- timm interface
    @property
    def bu_columns(self) -> Sequence[Column]:
        return self.columns[: self.num_bu_columns]

    @property
    def td_columns(self) -> Sequence[Column]:
        return self.columns[self.num_bu_columns:]

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter name under the shared RevCol layer-decay rule."""
        return layer_id(name, self.num_levels, self.blocks_per_level, self.num_bu_columns, self.num_td_columns)

    def num_layers(self) -> int:
        return num_layers(self.num_levels, self.blocks_per_level, self.num_bu_columns, self.num_td_columns)

    def group_matcher(self, coarse: bool = False):
        """timm group matcher (a callable): maps parameter names to the layer-decay ids."""
        return self.layer_id

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith("alphas")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's memory-saving switch; here it selects the reversible engine."""
        self.reversible = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    # ----------------------------------------------------------------- forward pieces
    def embed(self, x: Tensor) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """Images -> (tokens + pos (B, N, D), pos (1, N, D), grid (H, W))."""
        tokens, hw = self.patch_embed(x)
        # Column states live in the parameters' dtype, also under autocast (the conv itself
        # runs in bf16/fp16 there): the reversible rebuild ``(c - F) / alpha`` then replays
        # every state in exactly the dtype the forward produced (docs/ARCHITECTURE.md).
        # The copy also makes them contiguous: the conv's (B, D, h, w) output flattened and
        # transposed has strides (N*D, 1, N), and every state computed from it would keep that
        # layout, so that each LayerNorm would copy its input first.
        # (``.to`` returns its input unchanged when the dtype already matches.)
        tokens = tokens.to(self.patch_embed.proj.weight.dtype, memory_format=torch.contiguous_format).contiguous()
        pos = sincos_pos_embed_2d(hw[0], hw[1], self.embed_dim, tokens.device, tokens.dtype)
        return tokens + pos, pos, hw

    def draw_drop_path(self, batch: int, device) -> Tuple[Tensor, Tensor]:
        """Per-sample drop-path scales for the BU and TD segments.

        Each is (num_columns, B, blocks_per_column, 2) with values 0 or 1/keep_prob, or an
        empty tensor when drop path is off.
        """
        if not self.training or self.drop_path_rate == 0:
            empty = torch.empty(0, device=device)
            return empty, empty
        nc = self.num_bu_columns + self.num_td_columns
        rates = self.drop_rates.view(nc, 1, self.blocks_per_column, 1).to(device)
        keep_prob = 1.0 - rates
        keep = (torch.rand(nc, batch, self.blocks_per_column, 2, device=device) < keep_prob).float() / keep_prob
        return keep[: self.num_bu_columns], keep[self.num_bu_columns:]

    def _run(self, columns, source, prev, keep, hw, needed_levels=None, last: bool = True) -> State:
        """Run ``columns``: reversible engine when training with gradients, else plain autograd.

        Only the levels that ``needed_levels`` (of the last column; None: all) depend on run.
        ``last``: no run follows this one in the forward, so the reversible engine may keep
        its last update's graph (``keep_last_graph``, see ``revcolv2.reversible``).
        """
        if len(columns) == 0:
            return prev
        if self.reversible and torch.is_grad_enabled() and self.training:
            return run_reversible(columns, source, prev, keep, hw, needed_levels,
                                  keep_last_graph=last and self.keep_last_graph)
        return run_plain(columns, source, prev, keep, hw, needed_levels)

    def unused_levels(self, td_levels: Optional[Sequence[int]]) -> List[Tuple[int, int]]:
        """(column, level) pairs that never run when only ``td_levels`` of the last column are read."""
        counts = levels_to_run(self.td_columns, td_levels) if self.num_td_columns else []
        counts = [self.num_levels] * self.num_bu_columns + counts
        return [(j, l) for j, col in enumerate(self.columns) for l in col.order[counts[j]:]]

    def freeze_unused_levels(self, td_levels: Optional[Sequence[int]] = None) -> List[str]:
        """Freeze (``requires_grad=False``) the parameters of levels that cannot reach the
        outputs ``td_levels`` (default: the top level, what :meth:`forward` reads).

        They stay in the model, so checkpoints keep loading unchanged; frozen, they get no
        gradient, no optimizer state and no weight decay, and DDP can run with
        ``find_unused_parameters=False``. Returns the frozen parameter names.
        """
        if td_levels is None:
            td_levels = (self.num_levels - 1,)
        frozen = []
        for j, l in self.unused_levels(td_levels):
            for name, p in self.columns[j].levels[l].named_parameters(prefix=f"columns.{j}.levels.{l}"):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    def compile_levels(self, **compile_kwargs) -> "RevColV2":
        """``torch.compile`` every level's F_l in place (plain and reversible modes use them).

        Default ``fullgraph=True``: a graph break is an error, not a silent slowdown. The
        levels share ``Level.forward``'s code, and each variant (with or without fusion,
        window sizes, grad or not, drop path on or off, autocast) is one cached graph of it:
        more than torch's default recompile limit allows. Raising that limit is a
        process-wide switch, so it is the program's step, not this method's: call
        :func:`allow_level_recompiles` first (the benchmark scripts do).
        """
        import torch._dynamo

        limit = torch._dynamo.config.recompile_limit
        if limit < LEVEL_RECOMPILE_LIMIT:
            raise RuntimeError(
                f"compile_levels() needs torch._dynamo.config.recompile_limit >= {LEVEL_RECOMPILE_LIMIT} (it is "
                f"{limit}): the levels' graph variants would exceed it and fullgraph compilation would fail "
                "mid-training. Call revcolv2.model.allow_level_recompiles() once where your program starts.")
        compile_kwargs.setdefault("fullgraph", True)
        for col in self.columns:
            for level in col.levels:
                level.compile(**compile_kwargs)
        return self

    @staticmethod
    def hand_off(t: Tensor, ids_keep: Tensor, fill: Tensor) -> Tensor:
        """Scatter visible tokens (B, Nv, D) back to full length; holes take ``fill`` (B|1, N, D)."""
        b, _, d = t.shape
        full = fill.expand(b, -1, -1).to(t.dtype)
        return full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), t)

    def forward_columns(
        self, x: Tensor, ids_keep: Optional[Tensor] = None, mask_token: Optional[Tensor] = None,
        td_levels: Optional[Sequence[int]] = None,
    ) -> Tuple[State, Optional[State], Tuple[int, int]]:
        """Run the columns. Returns (last BU state, last TD state, token grid).

        With ``ids_keep`` (B, Nv) the BU columns see only those tokens; at the hand-off each
        level (and the patch tokens that feed the TD columns) is scattered back to full
        length with ``mask_token`` + position embedding at the masked positions.

        ``td_levels``: the levels of the last TD column the caller reads (None: all). Only
        the levels they depend on run, in forward and backward; the others come back as
        ``None``. ``()`` skips the TD columns (the TD state is then None). Outputs that do
        run are identical, drop-path draws included.
        """
        tokens, pos, hw = self.embed(x)
        keep_bu, keep_td = self.draw_drop_path(tokens.shape[0], tokens.device)
        run_td = td_levels is None or len(td_levels) > 0
        if ids_keep is None:
            bu = self._run(self.bu_columns, tokens, None, keep_bu, hw, last=not (run_td and self.num_td_columns))
            td = self._run(self.td_columns, tokens, bu, keep_td, hw, td_levels) if run_td else None
            return bu, td, hw
        if mask_token is None:
            raise ValueError("masked forward needs a mask_token")
        d = tokens.shape[-1]
        visible = tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, Nv, D)
        bu = self._run(self.bu_columns, visible, None, keep_bu, None, last=not (run_td and self.num_td_columns))
        if not run_td:
            return bu, None, hw
        fill = mask_token.to(tokens.dtype) + pos  # (1, N, D)
        td_source = self.hand_off(visible, ids_keep, fill)
        td_prev = tuple(self.hand_off(c, ids_keep, fill) for c in bu)
        td = self._run(self.td_columns, td_source, td_prev, keep_td, hw, td_levels)
        return bu, td, hw

    def forward_bottom_up(self, x: Tensor) -> List[Tensor]:
        """Levels of the last bottom-up column, each (B, N, D), level 0 first.

        Only the BU columns run: the linear probe's path (its head sits on the top BU level).
        """
        return list(self.forward_columns(x, td_levels=())[0])

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's intermediate-feature API over the levels of the last column.

        The intermediates are the ``num_levels`` levels of the last column (the last TD
        column, or the last BU column when there is none), level 0 first; ``indices``
        selects among them as in timm (None: all, int n: the last n, sequence: those).
        ``output_fmt`` 'NCHW' gives (B, D, H/p, W/p) maps, 'NLC' (B, N, D) tokens. Returns
        ``(final features, intermediates)`` with the final features those of
        :meth:`forward_features`, or only the intermediates with ``intermediates_only``.
        ``norm`` and ``stop_early`` are accepted for timm compatibility and change nothing:
        the levels have no final norm (``fc_norm`` belongs to the classifier) and every
        column feeds every level of the last one.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        # only the requested levels (and the top one for the final features) run
        wanted = set(take_indices) | (set() if intermediates_only else {self.num_levels - 1})
        _, last, (h, w) = self.forward_columns(x, td_levels=sorted(wanted))
        levels = [last[i] for i in take_indices]
        if output_fmt == "NCHW":
            levels = [t.transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in levels]
        if intermediates_only:
            return levels
        return last[-1], levels

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """timm hook of ``features_only``: drop the classifier (no column can be dropped)."""
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Top level of the last column (B, N, D): what :meth:`forward_head` pools.

        Only the levels that can reach it run (see ``forward_columns(td_levels=...)``).
        """
        return self.forward_columns(x, td_levels=(self.num_levels - 1,))[1][-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, D) tokens -> logits (B, K); with ``global_pool=''`` no pooling: (B, N, K)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        # the classifier reads only the top level: the levels that cannot reach it do not run
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def create_revcolv2(
    variant: str, pretrained: bool = False, model_cls: Type[RevColV2] = RevColV2, **kwargs
) -> RevColV2:
    """The one construction path: preset sizes of ``variant`` + ``kwargs`` -> ``model_cls``.

    ``timm.create_model``, :func:`revcolv2.mim.create_mim_model` and the detectron2
    backbone all build through here, so a size override (``num_bu_columns=4``) reaches
    every consumer through the built module (``model.layer_id``, ``model.feature_info``).
    ``pretrained=True`` loads the preset's weights through timm, e.g. a local file with
    ``pretrained_cfg_overlay=dict(file="model.safetensors")``.
    """
    if variant not in MODEL_CFGS:
        raise ValueError(f"unknown RevColV2 variant {variant!r}; choose from {sorted(MODEL_CFGS)}")
    model_args = dict(MODEL_CFGS[variant], **kwargs)
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(model_args.get("num_levels", 4)))),
        **model_args,
    )


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_CFGS})


@register_model
def revcolv2_tiny(pretrained: bool = False, **kwargs) -> RevColV2:
    return create_revcolv2("revcolv2_tiny", pretrained, **kwargs)


@register_model
def revcolv2_base(pretrained: bool = False, **kwargs) -> RevColV2:
    return create_revcolv2("revcolv2_base", pretrained, **kwargs)


@register_model
def revcolv2_large(pretrained: bool = False, **kwargs) -> RevColV2:
    return create_revcolv2("revcolv2_large", pretrained, **kwargs)
