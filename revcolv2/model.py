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
import logging
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from timm.layers import global_pool_nlc
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .checkpoint import PRETRAIN_ONLY_PREFIXES, unwrap_state_dict
from .layer_decay import layer_id, num_layers
from .reversible import State, levels_to_run, run_plain, run_reversible

__all__ = ["RevColV2", "MODEL_CFGS", "create_revcolv2", "checkpoint_filter_fn", "sincos_pos_embed_2d"]

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

_logger = logging.getLogger(__name__)

ALPHA_MIN = 1e-3  # |alpha| is kept at least this large so the inverse stays well defined


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
    """Non-overlapping patch projection with clear errors for unusable inputs."""

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
    (0 or 1/keep_prob; None: ``x + branch``).

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
        w: List[Tensor] = []  # bf16 LayerNorm affines under bf16 autocast (see bf16_layer_norm)
        if not torch.jit.is_scripting() and bf16_autocast_on(x):
            w = bf16_affines([self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias])
        a = self._attend(bf16_layer_norm(x, w[0], w[1], self.norm1.eps) if len(w) > 0 else self.norm1(x), hw)
        if self.gamma1 is not None:
            a = a * self.gamma1
        x = residual_add(x, a, None if keep is None else keep[:, 0])
        m = self.mlp(bf16_layer_norm(x, w[2], w[3], self.norm2.eps) if len(w) > 0 else self.norm2(x))
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
        if not torch.jit.is_scripting() and bf16_autocast_on(cross):
            w = bf16_affines([self.norm.weight, self.norm.bias])
            return self.proj(bf16_layer_norm(cross, w[0], w[1], self.norm.eps))
        return self.proj(self.norm(cross))


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


class PrunedLevel(nn.Module):
    """Stands in for a level that no output of the model reads: it is not built (no parameters)
    and raises if called. It keeps the other levels at their index, so parameter names, layer
    ids and checkpoints are those of the full model."""

    def __init__(self, column: int, level: int):
        super().__init__()
        self.column = column
        self.level = level

    def forward(
        self, inp: Tensor, cross: Optional[Tensor], keep: Optional[Tensor], hw: Optional[Tuple[int, int]]
    ) -> Tensor:
        raise RuntimeError(
            "level {} of column {} is not built: no output of this model reads it. Build the model "
            "with out_levels='all' (or the levels you need) to run it".format(self.level, self.column)
        )


# torch.jit.script can index a ModuleList by a variable only through an interface type (used
# in Column.level_f when scripting). Declaring one warns that TorchScript is deprecated in
# torch 2.x; silenced, as importing the model should not warn about a tool it may never use.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)

    @torch.jit.interface
    class LevelFn(nn.Module):
        def forward(
            self, inp: Tensor, cross: Optional[Tensor], keep: Optional[Tensor], hw: Optional[Tuple[int, int]]
        ) -> Tensor:
            pass


class Column(nn.Module):
    """One reversible column. ``direction`` 'up' updates levels 0 -> L-1, 'down' L-1 -> 0.

    The wiring of a column lives here and only here: :attr:`order` (update order),
    :meth:`in_level` (which level of this column feeds level ``l``; None: the source tokens)
    and :meth:`cross_level` (which level of the previous column feeds it). Forward,
    inversion and the reversible engine's backward all go through the per-level
    :meth:`step_from` (``c_l = alpha_l * c_l(prev) + F_l(in, cross)``) and its inverse
    :meth:`unstep`.

    ``keep`` (B, L * blocks_per_level, 2) holds drop-path scales in execution order.

    A column may build only a prefix of its update order (:attr:`num_built` levels, see
    :meth:`prune`): the others are :class:`PrunedLevel` placeholders. Its ``alphas`` keep one
    row per level, so checkpoints keep their shapes; the rows of pruned levels are unused.
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
        self.num_built = n  # the first num_built levels of ``order`` are built
        self.alpha_min = ALPHA_MIN  # an attribute, as TorchScript reads no global floats

    def prune(self, num_built: int, column: int) -> None:
        """Keep the first ``num_built`` levels of the update order; replace the others by
        :class:`PrunedLevel` (``column`` is this column's index, for its error message)."""
        if num_built > self.num_built:
            raise ValueError(f"column {column} builds {self.num_built} levels; pruning cannot add levels")
        for l in self.order[num_built:]:
            self.levels[l] = PrunedLevel(column, l)
        self.num_built = num_built

    def built_levels(self) -> List[int]:
        """The levels this column builds, in update order."""
        return self.order[: self.num_built]

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
        alphas = self.alphas
        if alphas is None:
            raise RuntimeError("the first column has no alpha: it has no previous column")
        magnitude = alphas.abs().clamp(min=self.alpha_min)
        return torch.where(alphas >= 0, magnitude, -magnitude)  # (not copysign: ONNX has no signbit)

    def alpha(self, l: int) -> Tensor:
        """alpha_l, clamped as in :meth:`alpha_values`."""
        return self.alpha_values()[l]

    def _level_keep(self, keep: Optional[Tensor], l: int) -> Optional[Tensor]:
        if keep is None:
            return None
        pos = self.order.index(l) * self.blocks_per_level
        return keep[:, pos:pos + self.blocks_per_level]

    def level_f(self, l: int, inp: Tensor, cross: Optional[Tensor], keep: Optional[Tensor],
                hw: Optional[Tuple[int, int]]) -> Tensor:
        """F_l(in, cross): fusion then the level's blocks."""
        keep = self._level_keep(keep, l)
        if torch.jit.is_scripting():
            level: LevelFn = self.levels[l]  # TorchScript indexes by a variable only through an interface
            return level.forward(inp, cross, keep, hw)
        else:
            return self.levels[l](inp, cross, keep, hw)  # through __call__: hooks, compile_levels

    @staticmethod
    def step_from(f: Tensor, prev_l: Optional[Tensor], alpha: Optional[Tensor]) -> Tensor:
        """The update given F: ``alpha * prev + f`` (``f`` in the first column).

        One ``addcmul`` kernel instead of a multiply and an add: it reads ``f`` and ``prev``
        once and writes the new state once (the dtype follows the same promotion).
        """
        if prev_l is None:
            return f
        assert alpha is not None  # (a previous value always comes with its alpha; refines the type for TorchScript)
        return torch.addcmul(f, alpha, prev_l)

    @staticmethod
    def unstep(new_l: Tensor, f: Tensor, alpha: Tensor) -> Tensor:
        """Inverse of :meth:`step_from`: ``prev_l = (new_l - f) / alpha_l``."""
        return (new_l - f) / alpha

    # ----------------------------------------------------------------- whole column
    def forward(self, source: Tensor, prev: Optional[List[Optional[Tensor]]], keep: Optional[Tensor],
                hw: Optional[Tuple[int, int]], num_levels: Optional[int] = None) -> List[Optional[Tensor]]:
        """Update the first ``num_levels`` levels of :attr:`order` (every built one by default);
        levels not run are None in the returned state. Written for torch.jit.script as well."""
        if (prev is not None) != self.has_prev:
            raise RuntimeError("column called with a previous state that does not match has_prev")
        k = self.num_built if num_levels is None else num_levels
        if k > self.num_built:
            raise RuntimeError("column asked to run {} levels but builds only {}".format(k, self.num_built))
        new: List[Optional[Tensor]] = [None for _ in range(len(self.levels))]
        alphas: Optional[Tensor] = None
        if prev is not None and k > 0:
            alphas = self.alpha_values()  # (L, D), once per column
        for l in self.order[:k]:
            in_l = self.in_level(l)
            inp = source
            if in_l is not None:
                t = new[in_l]
                assert t is not None
                inp = t
            cross: Optional[Tensor] = None
            prev_l: Optional[Tensor] = None
            alpha: Optional[Tensor] = None
            if prev is not None:
                c = self.cross_level(l)
                if c is not None:
                    cross = prev[c]
                prev_l = prev[l]
            if alphas is not None:
                alpha = alphas[l]
            new[l] = self.step_from(self.level_f(l, inp, cross, keep, hw), prev_l, alpha)
        return new

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


POOL_TYPES = ("avg", "max", "avgmax", "")


def _check_global_pool(global_pool: str) -> str:
    """timm's pools for token models: 'avg' / 'max' / 'avgmax' over tokens; '': no pooling,
    the head runs on every token. 'token' and 'map' are refused: there is no class token
    and no attention-pool head."""
    if global_pool in ("token", "map"):
        raise ValueError(
            f"global_pool={global_pool!r} is not available: RevColV2 has no class token and no attention-pool "
            f"head; use one of {POOL_TYPES} ('' for no pooling)")
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES} ('' for no pooling), got {global_pool!r}")
    return global_pool


def _resolve_out_levels(out_levels: Union[str, Sequence[int]], num_levels: int) -> Tuple[int, ...]:
    """'top' -> (L-1,), 'all' -> (0..L-1), or the given levels, checked and sorted."""
    if isinstance(out_levels, str):
        if out_levels not in ("top", "all"):
            raise ValueError(f"out_levels must be 'top', 'all' or a sequence of levels, got {out_levels!r}")
        return (num_levels - 1,) if out_levels == "top" else tuple(range(num_levels))
    levels = tuple(sorted({int(l) for l in out_levels}))
    if not levels or levels[0] < 0 or levels[-1] >= num_levels:
        raise ValueError(f"out_levels must name at least one level in 0..{num_levels - 1}, got {tuple(out_levels)}")
    return levels


class LevelMap(nn.Module):
    """(B, N, D) tokens of one level -> (B, D, H, W) map: a view, no copy, no parameters.

    One per level (``RevColV2.level_maps``): the named point where timm's ``feature_cls='hook'``
    and ``'fx'`` extractors read a level (``feature_info`` names it) and where
    :meth:`RevColV2.forward_intermediates` takes its maps.
    """

    def forward(self, tokens: Tensor, hw: Tuple[int, int]) -> Tensor:
        return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[2]).permute(0, 3, 1, 2)


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
        keep_last_graph: with ``reversible``, the forward's last level update keeps its graph
            for the backward instead of rebuilding it there (one level evaluation fewer per
            step; the graph waits while the heads run, see ``docs/ARCHITECTURE.md``).
        head_init_scale: multiplies the initial classifier weights (0.001 in fine-tuning).
        global_pool: 'avg', 'max', 'avgmax' or '' (no pooling).
        out_levels: the levels of the last column the model computes: 'top' (the default:
            what the classifier reads), 'all' (dense prediction, MIM, features) or a sequence.
            The levels that none of them depends on are not built (:class:`PrunedLevel`), so
            every parameter of the model is used by its forward: in a TD column the top
            level is updated first, and a classifier builds neither levels 0-2 of the last TD
            column nor, with 2 TD columns, levels 0-1 of the one before.
        fc_norm: LayerNorm after pooling (False: none, as in feature extractors).
    """

    __jit_unused_properties__ = ["bu_columns", "td_columns"]

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
        keep_last_graph: bool = True,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        out_levels: Union[str, Sequence[int]] = "top",
        fc_norm: bool = True,
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
        self.keep_last_graph = keep_last_graph
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
        self.level_maps = nn.ModuleList([LevelMap() for _ in range(num_levels)])

        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)
        # built whole first, so a pruned model holds exactly the full model's initial weights
        self.out_levels = tuple(range(num_levels))
        self.prune_levels(_resolve_out_levels(out_levels, num_levels))

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

    # ----------------------------------------------------------------- which levels are built
    @torch.jit.ignore
    def prune_levels(self, out_levels: Sequence[int]) -> None:
        """Build only what the levels ``out_levels`` of the last column depend on.

        BU columns always keep every level (the linear probe reads the last one); in the TD
        columns every level that cannot reach ``out_levels`` becomes a :class:`PrunedLevel`.
        Pruning only removes: asking for a level already pruned is a ``ValueError``.
        """
        out_levels = _resolve_out_levels(out_levels, self.num_levels)
        if self.num_td_columns:
            counts = levels_to_run(self.td_columns, out_levels)
            last = self.columns[-1]
            missing = [l for l in out_levels if l not in last.built_levels()]
            if missing:
                raise ValueError(
                    f"levels {missing} of the last column are not built in this model (it builds "
                    f"{sorted(last.built_levels())}): build it with out_levels='all' or {list(out_levels)}")
            for j, (col, k) in enumerate(zip(self.td_columns, counts), start=self.num_bu_columns):
                col.prune(k, j)
        else:  # the last column is bottom-up: its top level needs all of its levels
            out_levels = tuple(range(self.num_levels))
        self.out_levels = tuple(out_levels)
        self.feature_info = self._feature_info()

    def newest_columns(self) -> List[int]:
        """For each level, the last column that computes it: where its newest value comes from."""
        return [max(j for j, col in enumerate(self.columns) if l in col.built_levels())
                for l in range(self.num_levels)]

    def _feature_info(self) -> List[dict]:
        """timm feature metadata: every level at the patch stride, read at ``level_maps.l``;
        ``column`` names the column its value comes from (the last one that builds it)."""
        return [dict(module=f"level_maps.{l}", num_chs=self.embed_dim, reduction=self.patch_size, column=j)
                for l, j in enumerate(self.newest_columns())]

    def pruned_levels(self) -> List[Tuple[int, int]]:
        """(column, level) pairs that this model does not build."""
        return sorted((j, l) for j, col in enumerate(self.columns) for l in col.order[col.num_built:])

    def pruned_prefixes(self) -> Tuple[str, ...]:
        """Parameter-name prefixes of the levels this model does not build; a checkpoint of
        the full model has tensors there that this model leaves out."""
        return tuple(f"columns.{j}.levels.{l}." for j, l in self.pruned_levels())

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

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """timm group matcher. Fine (default): the layer-decay ids, a callable on parameter
        names. ``coarse=True``: one group per column (timm's stage-level grouping), after
        the patch embedding and before the classifier."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=r"^columns\.(\d+)\.")
        return self.layer_id

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith("alphas")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's memory-saving switch; here it selects the reversible engine."""
        self.reversible = enable

    @torch.jit.ignore
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

    def _draw_keep(self, batch: int, device: torch.device) -> Tensor:
        """Per-sample drop-path scales of every column, (num_columns, B, blocks_per_column, 2),
        each 0 or 1/keep_prob."""
        nc = self.num_bu_columns + self.num_td_columns
        rates = self.drop_rates.view(nc, 1, self.blocks_per_column, 1).to(device)
        keep_prob = 1.0 - rates
        return (torch.rand(nc, batch, self.blocks_per_column, 2, device=device) < keep_prob).float() / keep_prob

    def draw_drop_path(self, batch: int, device) -> Tuple[Tensor, Tensor]:
        """:meth:`_draw_keep` split into the BU and TD columns, or two empty tensors when
        drop path is off (the reversible engine's convention)."""
        if not self.training or self.drop_path_rate == 0:
            empty = torch.empty(0, device=device)
            return empty, empty
        keep = self._draw_keep(batch, device)
        return keep[: self.num_bu_columns], keep[self.num_bu_columns:]

    def _use_reversible(self, tokens: Tensor) -> bool:
        """The reversible engine trains; fx cannot trace its autograd Function, so a traced
        model runs (and trains) through plain autograd."""
        return (self.reversible and self.training and torch.is_grad_enabled()
                and not isinstance(tokens, torch.fx.Proxy))

    def _run(self, columns, source, prev, keep, hw, needed_levels=None, last: bool = True) -> State:
        """Run ``columns``: reversible engine when training with gradients, else plain autograd.

        Only the levels that ``needed_levels`` (of the last column; None: every built one)
        depend on run. ``last``: no run follows this one in the forward, so the reversible
        engine may keep its last update's graph (``keep_last_graph``, see
        ``revcolv2.reversible``).
        """
        if len(columns) == 0:
            return prev
        if needed_levels is None:
            needed_levels = columns[-1].built_levels()
        if self._use_reversible(source):
            return tuple(run_reversible(columns, source, prev, keep, hw, needed_levels,
                                        keep_last_graph=last and self.keep_last_graph))
        return tuple(run_plain(columns, source, prev, keep, hw, needed_levels))

    def _run_counts(self, last_count: Optional[int]) -> List[int]:
        """Levels each column runs: every one it builds; the last column at most ``last_count``."""
        counts = [col.num_built for col in self.columns]
        if last_count is not None:
            counts[-1] = min(counts[-1], last_count)
        return counts

    def forward_state(self, x: Tensor, last_count: Optional[int] = None) -> Tuple[List[Tensor], Tuple[int, int]]:
        """The newest value of every level, each (B, N, D), level 0 first, and the grid (H, W).

        The newest value of level ``l`` is the one computed by the last column that builds
        it: with ``out_levels='all'`` the last column's levels; in a classifier, the top level
        of the last TD column and the lower ones from the columns before. ``last_count``: run
        only that many levels of the last column (its update order), as ``stop_early`` does.
        Every column runs every level it builds otherwise. Plain autograd in eval mode (the
        path torch.fx and torch.jit.script see), the reversible engine in training.
        """
        tokens, _, hw = self.embed(x)
        counts = self._run_counts(last_count)
        if not torch.jit.is_scripting():  # TorchScript leaves this branch out: the engine is Python
            if self._use_reversible(tokens):
                return self._state_reversible(tokens, hw, counts), hw
        keep: Optional[Tensor] = None
        if self.training and self.drop_path_rate > 0:
            keep = self._draw_keep(tokens.shape[0], tokens.device)
        newest: List[Optional[Tensor]] = [None for _l in range(self.num_levels)]
        state: Optional[List[Optional[Tensor]]] = None
        for j, col in enumerate(self.columns):
            new = col(tokens, state, None if keep is None else keep[j], hw, counts[j])
            for l, t in enumerate(new):
                if t is not None:
                    newest[l] = t
            state = new
        out: List[Tensor] = []
        for t in newest:
            assert t is not None  # the BU columns compute every level
            out.append(t)
        return out, hw

    def _state_reversible(self, tokens: Tensor, hw: Tuple[int, int], counts: List[int]) -> List[Tensor]:
        """:meth:`forward_state` with the reversible engine. A run returns its last column
        only, so the TD columns run in segments, each ending at a column that holds the newest
        value of some level (one segment unless a classifier has 2+ TD columns)."""
        keep_bu, keep_td = self.draw_drop_path(tokens.shape[0], tokens.device)
        nb = self.num_bu_columns
        ends = sorted({max((j for j, k in enumerate(counts) if l in self.columns[j].order[:k]))
                       for l in range(self.num_levels)} - set(range(nb)))
        # only the forward's last run may keep its last update's graph (keep_last_graph)
        state = run_reversible(self.bu_columns, tokens, None, keep_bu, hw,
                               keep_last_graph=self.keep_last_graph and not ends)
        newest = list(state)
        start = nb
        for end in ends:
            needed = self.columns[end].order[: counts[end]]
            state = run_reversible(self.columns[start:end + 1], tokens, state, keep_td[start - nb:end + 1 - nb],
                                   hw, needed, keep_last_graph=self.keep_last_graph and end == ends[-1])
            newest = [n if t is None else t for n, t in zip(newest, state)]
            start = end + 1
        return newest

    def forward_levels(self, x: Tensor, last_count: Optional[int] = None) -> Tuple[List[Tensor], List[Tensor]]:
        """:meth:`forward_state` as tokens (B, N, D) and as maps (B, D, H/p, W/p): the maps are
        views made by ``level_maps``, where timm's hook and fx feature extractors read them."""
        tokens, hw = self.forward_state(x, last_count)
        maps: List[Tensor] = []
        for l, to_map in enumerate(self.level_maps):
            maps.append(to_map(tokens[l], hw))
        return tokens, maps

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

        ``td_levels``: the levels of the last TD column the caller reads (None: every level
        the model builds). Only the levels they depend on run, in forward and backward; the
        others come back as ``None``. ``()`` skips the TD columns (the TD state is then
        None). Outputs that do run are identical, drop-path draws included. A level the
        model does not build is a ``ValueError``.
        """
        if td_levels is not None and self.num_td_columns:
            missing = sorted(set(td_levels) - set(self.columns[-1].built_levels()))
            if missing:
                raise ValueError(
                    f"levels {missing} of the last TD column are not built in this model (out_levels="
                    f"{self.out_levels}): build it with out_levels='all' to read them")
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
        """timm's intermediate-feature API over the levels, level 0 first.

        The intermediates are the newest values of the ``num_levels`` levels (see
        :meth:`forward_state`): the levels of the last column for a model built with
        ``out_levels='all'`` (``features_only=True``, the detectron2 backbone); ``feature_info``
        names the column each one comes from. ``indices`` selects as in timm (None: all, int
        n: the last n, sequence: those). ``output_fmt`` 'NCHW' gives (B, D, H/p, W/p) maps,
        'NLC' (B, N, D) tokens. Returns ``(final features, intermediates)``, the final
        features those of :meth:`forward_features`, or only the intermediates with
        ``intermediates_only``.

        ``stop_early=True``: the last column stops after the lowest level asked for (its
        levels run top-down), the values returned are the same. ``norm=True`` is refused:
        the levels have no final norm (``fc_norm`` belongs to the classifier, after pooling).
        """
        if norm:
            raise ValueError("norm=True is not supported: RevColV2's levels have no final norm "
                             "(fc_norm belongs to the classifier, after pooling)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        last_count = None
        if stop_early:
            last = self.columns[-1]
            wanted = set(take_indices) | (set() if intermediates_only else {self.num_levels - 1})
            last_count = max((last.order.index(l) + 1 for l in wanted if l in last.built_levels()), default=0)
        tokens, maps = self.forward_levels(x, last_count)
        levels = [maps[i].contiguous() if output_fmt == "NCHW" else tokens[i] for i in take_indices]
        if intermediates_only:
            return levels
        return tokens[-1], levels

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """timm hook of ``features_only``: keep only what the levels ``indices`` need (the
        levels of the last column that none of them depends on are pruned) and, with
        ``prune_head``, drop the classifier and its norm."""
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        from_last = [l for l in take_indices if l in self.columns[-1].built_levels()]
        if not from_last:
            raise ValueError(
                f"levels {take_indices} all come from columns before the last one in this model (out_levels="
                f"{self.out_levels}): build it with out_levels='all' (features_only=True does) to take them")
        self.prune_levels(from_last)
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """Top level (B, N, D), what :meth:`forward_head` pools. Every level the model builds
        runs, and passes through ``level_maps`` (free views) for timm's feature extractors."""
        tokens, _ = self.forward_levels(x)
        return tokens[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, D) tokens -> logits (B, K); with ``global_pool=''`` no pooling: (B, N, K)."""
        x = global_pool_nlc(x, pool_type=self.global_pool, num_prefix_tokens=0)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
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


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: RevColV2) -> Dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: unwrap the checkpoint and leave out what ``model`` does
    not hold: the pre-training-only tensors (mask token, reconstruction head), the levels it
    does not build (``model.pruned_prefixes()``) and, in a model without one, the classifier
    norm. Whatever is left out is logged; everything else must match the model."""
    sd = unwrap_state_dict(state_dict)
    absent = PRETRAIN_ONLY_PREFIXES + model.pruned_prefixes()
    if isinstance(model.fc_norm, nn.Identity):
        absent += ("fc_norm.",)
    kept = {k: v for k, v in sd.items() if not k.startswith(absent)}
    if len(kept) < len(sd):
        _logger.info("left out %d checkpoint tensors this model does not hold: %s",
                     len(sd) - len(kept), ", ".join(k for k in sd if k not in kept))
    return kept


FEATURE_CLASSES = ("getter", "hook", "fx")


def _feature_model_args(model_args: dict, feature_cfg: dict) -> dict:
    """Constructor arguments of a ``features_only`` model: the levels ``out_indices`` need,
    no classifier, no pooling, no classifier norm, so every parameter feeds a feature."""
    feature_cls = model_args.get("feature_cls", feature_cfg.get("feature_cls"))
    name = feature_cls.lower() if isinstance(feature_cls, str) else getattr(feature_cls, "__name__", feature_cls)
    known = {"getter": "getter", "hook": "hook", "fx": "fx",
             "FeatureGetterNet": "getter", "FeatureHookNet": "hook", "FeatureGraphNet": "fx"}
    if name not in known:
        raise ValueError(
            f"features_only with feature_cls={feature_cls!r} is not supported by RevColV2: use one of "
            f"{FEATURE_CLASSES} ('list' and 'dict' rebuild the model as a sequence of stages, and "
            "RevColV2's levels are not stages of one sequence)")
    out_indices = model_args.get("out_indices", feature_cfg["out_indices"])
    take, _ = feature_take_indices(model_args.get("num_levels", 4), out_indices)
    return dict(out_levels=take, num_classes=0, global_pool="", fc_norm=False)


def create_revcolv2(
    variant: str, pretrained: bool = False, model_cls: Type[RevColV2] = RevColV2, **kwargs
) -> RevColV2:
    """The one construction path: preset sizes of ``variant`` + ``kwargs`` -> ``model_cls``.

    ``timm.create_model``, :func:`revcolv2.mim.create_mim_model` and the detectron2
    backbone all build through here, so a size override (``num_bu_columns=4``) reaches
    every consumer through the built module (``model.layer_id``, ``model.feature_info``).
    ``pretrained=True`` loads the preset's weights through timm, e.g. a local file with
    ``pretrained_cfg_overlay=dict(file="model.safetensors")``; :func:`checkpoint_filter_fn`
    leaves out the checkpoint tensors the model does not hold.

    ``features_only=True`` builds the levels ``out_indices`` need (all four by default),
    without classifier; ``feature_cls`` 'getter' (default, ``forward_intermediates``),
    'hook' or 'fx' (both read ``level_maps``) give the same maps.
    """
    if variant not in MODEL_CFGS:
        raise ValueError(f"unknown RevColV2 variant {variant!r}; choose from {sorted(MODEL_CFGS)}")
    model_args = dict(MODEL_CFGS[variant], **kwargs)
    feature_cfg = dict(feature_cls="getter", out_indices=tuple(range(model_args.get("num_levels", 4))))
    feature_cfg.update(model_args.pop("feature_cfg", None) or {})
    if model_args.get("features_only"):
        model_args.update(_feature_model_args(model_args, feature_cfg))
    return build_model_with_cfg(
        model_cls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, feature_cfg=feature_cfg,
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
