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
above for BU, below for TD; the wiring lives in ``revcolv2.plan``). ``F_l`` = fusion then
the level's ViT blocks. The update is invertible given ``in`` (:meth:`Column.unstep`), which
``revcolv2.reversible`` uses to train without storing activations.

Layers (patch embedding, attention, MLP, fusion, the bf16 norms and the fused residual, the
TorchScript and compile plumbing) live in ``revcolv2.layers``; which levels each column
builds and runs in ``revcolv2.plan``.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import global_pool_nlc
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .checkpoint import PRETRAIN_ONLY_PREFIXES, unwrap_state_dict
from .layer_decay import layer_id, num_layers
from .layers import (
    LEVEL_RECOMPILE_LIMIT,
    Attention,
    Fusion,
    LevelFn,
    LevelMap,
    Mlp,
    PatchEmbed,
    allow_level_recompiles,
    bf16_affines,
    bf16_autocast_on,
    bf16_layer_norm,
    hand_off,
    residual_add,
    sincos_pos_embed_2d,
    window_partition,
    window_unpartition,
)
from .plan import ColumnPlan, cross_level, in_level, resolve_out_levels, update_order
from .reversible import State, run_reversible

__all__ = ["RevColV2", "MODEL_CFGS", "create_revcolv2", "checkpoint_filter_fn", "sincos_pos_embed_2d",
           "allow_level_recompiles", "LEVEL_RECOMPILE_LIMIT", "compile_for_training"]

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

class Block(nn.Module):
    """Pre-norm ViT block; global attention, or windowed attention when ``window_size > 0``.

    Windowed attention needs the token grid (``hw``); without it (masked MIM input, where
    only visible tokens exist) the block attends globally. Drop path is applied with
    externally drawn per-sample scales ``drop_scales`` of shape (B, 2) (attention branch,
    MLP branch), so the reversible engine can replay them exactly.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 layer_scale_init: Optional[float] = None, window_size: int = 0):
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

    def forward(self, x: Tensor, drop_scales: Optional[Tensor] = None,
                hw: Optional[Tuple[int, int]] = None) -> Tensor:
        w: List[Tensor] = []  # bf16 LayerNorm affines under bf16 autocast (see bf16_layer_norm)
        if not torch.jit.is_scripting() and bf16_autocast_on(x):
            w = bf16_affines([self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias])
        a = self._attend(bf16_layer_norm(x, w[0], w[1], self.norm1.eps) if len(w) > 0 else self.norm1(x), hw)
        if self.gamma1 is not None:
            a = a * self.gamma1
        x = residual_add(x, a, None if drop_scales is None else drop_scales[:, 0])
        m = self.mlp(bf16_layer_norm(x, w[2], w[3], self.norm2.eps) if len(w) > 0 else self.norm2(x))
        if self.gamma2 is not None:
            m = m * self.gamma2
        return residual_add(x, m, None if drop_scales is None else drop_scales[:, 1])


class Level(nn.Module):
    """F_l: fuse (in-column input, cross-column input), then run the level's blocks."""

    def __init__(self, blocks: Sequence[Block], dim: int, has_cross: bool, fusion: str):
        super().__init__()
        self.fusion = Fusion(dim, fusion) if has_cross else None
        self.blocks = nn.ModuleList(blocks)

    def forward(self, inp: Tensor, cross: Optional[Tensor], drop_scales: Optional[Tensor],
                hw: Optional[Tuple[int, int]]) -> Tensor:
        x = inp if self.fusion is None or cross is None else inp + self.fusion(cross)
        for b, block in enumerate(self.blocks):
            x = block(x, None if drop_scales is None else drop_scales[:, b], hw)
        return x


class PrunedLevel(nn.Module):
    """Stands in for a level that no output of the model reads: it is not built (no parameters)
    and raises if called. It keeps the other levels at their index, so parameter names, layer
    ids and checkpoints are those of the full model."""

    def __init__(self, column: int, level: int):
        super().__init__()
        self.column = column
        self.level = level

    def forward(self, inp: Tensor, cross: Optional[Tensor], drop_scales: Optional[Tensor],
                hw: Optional[Tuple[int, int]]) -> Tensor:
        raise RuntimeError(
            "level {} of column {} is not built: no output of this model reads it. Build the model "
            "with out_levels='all' (or the levels you need) to run it".format(self.level, self.column)
        )


class Column(nn.Module):
    """One reversible column. ``direction`` 'up' updates levels 0 -> L-1, 'down' L-1 -> 0.

    Its wiring is :attr:`order` (update order), :meth:`in_level` and :meth:`cross_level`,
    as ``revcolv2.plan`` defines them. The plain forward and the reversible engine both go
    through the per-level :meth:`step_from` (``c_l = alpha_l * c_l(prev) + F_l(in, cross)``);
    the engine's rebuild through its inverse :meth:`unstep`.

    ``drop_scales`` (B, L * blocks_per_level, 2) holds the drop-path scales in execution order.
    Levels the model does not build are :class:`PrunedLevel` placeholders; ``alphas`` keep one
    row per level, so checkpoints keep their shapes (the rows of pruned levels are unused).
    """

    def __init__(self, levels: Sequence[Level], direction: str, has_prev: bool, dim: int, alpha_init: float):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.direction = direction
        self.has_prev = has_prev
        n = len(levels)
        self.alphas = nn.Parameter(torch.full((n, dim), alpha_init)) if has_prev else None
        self.order = update_order(direction, n)
        self.blocks_per_level = len(levels[0].blocks)
        self.alpha_min = 1e-3  # |alpha| >= this keeps the inverse well defined (an attribute: TorchScript)

    def in_level(self, l: int) -> Optional[int]:
        """Level of this column that feeds level ``l`` (None: the source tokens)."""
        return in_level(self.order, l)

    def cross_level(self, l: int) -> Optional[int]:
        """Level of the previous column fused into level ``l`` (above for BU, below for TD)."""
        return cross_level(self.direction, l, len(self.levels), self.has_prev)

    # ----------------------------------------------------------------- one level
    def alpha_values(self) -> Tensor:
        """Every level's alpha (L, D), magnitude clamped to at least ``alpha_min``, sign kept
        (+alpha_min at 0). A run computes them once per column and indexes a level's row."""
        alphas = self.alphas
        if alphas is None:
            raise RuntimeError("the first column has no alpha: it has no previous column")
        magnitude = alphas.abs().clamp(min=self.alpha_min)
        return torch.where(alphas >= 0, magnitude, -magnitude)  # (not copysign: ONNX has no signbit)

    def _level_scales(self, drop_scales: Optional[Tensor], l: int) -> Optional[Tensor]:
        if drop_scales is None:
            return None
        pos = self.order.index(l) * self.blocks_per_level
        return drop_scales[:, pos:pos + self.blocks_per_level]

    def level_f(self, l: int, inp: Tensor, cross: Optional[Tensor], drop_scales: Optional[Tensor],
                hw: Optional[Tuple[int, int]]) -> Tensor:
        """F_l(in, cross): fusion then the level's blocks."""
        drop_scales = self._level_scales(drop_scales, l)
        if torch.jit.is_scripting():
            level: LevelFn = self.levels[l]  # TorchScript indexes by a variable only through an interface
            return level.forward(inp, cross, drop_scales, hw)
        else:
            return self.levels[l](inp, cross, drop_scales, hw)  # through __call__: hooks, compile_levels

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
    def forward(self, source: Tensor, prev: Optional[List[Optional[Tensor]]], drop_scales: Optional[Tensor],
                hw: Optional[Tuple[int, int]], num_levels: Optional[int] = None) -> List[Optional[Tensor]]:
        """Update the first ``num_levels`` levels of :attr:`order` (default: all); levels not
        run are None in the returned state. Written for torch.jit.script as well."""
        if (prev is not None) != self.has_prev:
            raise RuntimeError("column called with a previous state that does not match has_prev")
        k = len(self.levels) if num_levels is None else num_levels
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
            new[l] = self.step_from(self.level_f(l, inp, cross, drop_scales, hw), prev_l, alpha)
        return new


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
        retain_last_graph: with ``reversible``, the forward's last level update may retain its
            graph for the backward instead of rebuilding it there (one level evaluation fewer
            per step); the engine does so only when that level's parameters hold no gradient
            yet (``revcolv2.reversible``). False: never (heads with large activations).
        head_init_scale: multiplies the initial classifier weights (0.001 in fine-tuning).
        global_pool: 'avg', 'max', 'avgmax' or '' (no pooling).
        out_levels: the levels of the last column the model computes: 'top' (the default:
            what the classifier reads), 'all' (dense prediction, MIM, features) or a sequence.
            The levels that none of them depends on are not built (:class:`PrunedLevel`), so
            every parameter of the model is used by its forward: in a TD column the top
            level is updated first, and a classifier builds neither levels 0-2 of the last TD
            column nor, with 2 TD columns, levels 0-1 of the one before. :attr:`plan`
            (``revcolv2.plan.ColumnPlan``) holds what is built.
        fc_norm: LayerNorm after pooling (False: none, as in feature extractors).
    """

    __jit_ignored_attributes__ = ["plan"]

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
        retain_last_graph: bool = True,
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
        self.retain_last_graph = retain_last_graph
        self.drop_path_rate = drop_path_rate

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)

        plan = ColumnPlan.full(num_levels, num_bu_columns, num_td_columns)
        self.blocks_per_column = num_levels * blocks_per_level
        total_blocks = plan.num_columns * self.blocks_per_column
        global_set = set(global_attn_indexes)
        # stochastic depth grows linearly with execution depth (timm / MAE convention)
        self.register_buffer("drop_rates", torch.linspace(0, drop_path_rate, total_blocks), persistent=False)
        columns = []
        for j in range(plan.num_columns):
            levels: List[Optional[Level]] = [None] * num_levels
            for pos, l in enumerate(plan.order(j)):
                blocks = []
                for b in range(blocks_per_level):
                    g = j * self.blocks_per_column + pos * blocks_per_level + b
                    ws = 0 if g in global_set else window_size
                    blocks.append(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale_init, ws))
                levels[l] = Level(blocks, embed_dim, plan.cross_level(j, l) is not None, fusion)
            columns.append(Column(levels, plan.direction(j), j > 0, embed_dim, alpha_init))
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
        self.plan = plan
        self.prune_levels(out_levels)

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
    def prune_levels(self, out_levels: Union[str, Sequence[int]]) -> None:
        """Build only what the levels ``out_levels`` of the last column depend on
        (:meth:`revcolv2.plan.ColumnPlan.pruned`): the other levels become
        :class:`PrunedLevel`. Pruning only removes: a level already pruned is a ``ValueError``."""
        out_levels = resolve_out_levels(out_levels, self.num_levels)
        self.plan = plan = self.plan.pruned(out_levels)
        for j, l in plan.pruned_levels():
            if not isinstance(self.columns[j].levels[l], PrunedLevel):
                self.columns[j].levels[l] = PrunedLevel(j, l)
        # a model without TD columns computes every level (its top level needs them all)
        self.out_levels = out_levels if self.num_td_columns else tuple(range(self.num_levels))
        self._newest_run = plan.newest_run()  # what forward_features runs (TorchScript reads no plan)
        # timm feature metadata: every level at the patch stride, read at ``level_maps.l``;
        # ``column`` names the column its value comes from (the last one that builds it)
        self.feature_info = [dict(module=f"level_maps.{l}", num_chs=self.embed_dim, reduction=self.patch_size,
                                  column=j) for l, j in enumerate(plan.newest_columns())]

    # ----------------------------------------------------------------- timm interface
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

    # ----------------------------------------------------------------- the column runner
    def embed(self, x: Tensor) -> Tuple[Tensor, Tensor, Tuple[int, int]]:
        """Images -> (tokens + pos (B, N, D), pos (1, N, D), grid (H, W))."""
        tokens, hw = self.patch_embed(x)
        # Column states live in the parameters' dtype, also under autocast (the conv runs in
        # bf16/fp16 there), so the reversible rebuild replays every state in the forward's dtype;
        # and contiguous: the conv's flattened output has strides (N*D, 1, N), which every state
        # would inherit, and each LayerNorm would copy first (docs/ARCHITECTURE.md). ``.to``
        # returns its input unchanged when the dtype matches, hence ``.contiguous()``.
        tokens = tokens.to(self.patch_embed.proj.weight.dtype, memory_format=torch.contiguous_format).contiguous()
        pos = sincos_pos_embed_2d(hw[0], hw[1], self.embed_dim, tokens.device, tokens.dtype)
        return tokens + pos, pos, hw

    def draw_drop_scales(self, batch: int, device: torch.device) -> Optional[Tensor]:
        """Per-sample drop-path scales of every block, (num_columns, B, blocks_per_column, 2)
        (attention and MLP branch), each 0 or 1/keep_prob; None in eval mode or without drop path."""
        if not self.training or self.drop_path_rate == 0:
            return None
        nc = self.num_bu_columns + self.num_td_columns
        rates = self.drop_rates.view(nc, 1, self.blocks_per_column, 1).to(device)
        keep_prob = 1.0 - rates
        return (torch.rand(nc, batch, self.blocks_per_column, 2, device=device) < keep_prob).float() / keep_prob

    def _use_reversible(self, tokens: Tensor) -> bool:
        """The reversible engine trains; fx cannot trace its autograd Function, so a traced
        model runs (and trains) through plain autograd."""
        return (self.reversible and self.training and torch.is_grad_enabled()
                and not isinstance(tokens, torch.fx.Proxy))

    def run_columns(self, x: Tensor, counts: List[int], ends: List[int], visible_ids: Optional[Tensor] = None,
                    mask_token: Optional[Tensor] = None) -> Tuple[List[List[Optional[Tensor]]], Tuple[int, int]]:
        """The one column runner: embed ``x``, run the first ``counts[j]`` levels of column j
        (its update order) and return the state of each column in ``ends`` (ascending, from
        :class:`revcolv2.plan.ColumnPlan`) and the token grid. Levels not run are None.

        With ``visible_ids`` (B, Nv) the BU columns see only those tokens; before the first TD
        column every level, and the patch tokens that feed the TD columns, are scattered back
        to full length with ``mask_token`` + position embedding at the holes (MIM hand-off).
        Training with gradients runs the reversible engine, one run per stretch of columns
        that ends in ``ends`` (a run returns its last column); otherwise plain autograd (the
        path eval, torch.fx and torch.jit.script see).
        """
        tokens, pos, hw = self.embed(x)
        drop_scales = self.draw_drop_scales(tokens.shape[0], tokens.device)
        source = tokens
        if visible_ids is not None:
            source = tokens.gather(1, visible_ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # (B, Nv, D)
        reversible = False
        if not torch.jit.is_scripting():  # TorchScript leaves this branch out: the engine is Python
            reversible = self._use_reversible(tokens)
        states: List[List[Optional[Tensor]]] = []
        state: Optional[List[Optional[Tensor]]] = None
        start = 0
        for end in ends:
            if visible_ids is not None and start == self.num_bu_columns:  # the hand-off
                assert mask_token is not None and state is not None
                fill = mask_token.to(tokens.dtype) + pos  # (1, N, D)
                source = hand_off(source, visible_ids, fill)
                handed: List[Optional[Tensor]] = []
                for t in state:
                    assert t is not None  # the BU columns run every level
                    handed.append(hand_off(t, visible_ids, fill))
                state = handed
            grid = hw if visible_ids is None or start >= self.num_bu_columns else None  # visible tokens: no grid
            if reversible:
                state = self._run_reversible(start, end, source, state, drop_scales, grid, counts, end == ends[-1])
            else:
                for j, col in enumerate(self.columns):
                    if start <= j <= end:  # TorchScript indexes a ModuleList by constants only
                        state = col(source, state, None if drop_scales is None else drop_scales[j], grid, counts[j])
            assert state is not None
            states.append(state)
            start = end + 1
        return states, hw

    @torch.jit.unused
    def _run_reversible(self, start: int, end: int, source: Tensor, state: Optional[List[Optional[Tensor]]],
                        drop_scales: Optional[Tensor], hw: Optional[Tuple[int, int]], counts: List[int],
                        last: bool) -> List[Optional[Tensor]]:
        """Columns ``start..end`` as one run of the reversible engine; only the forward's
        ``last`` run may retain its last update's graph (``retain_last_graph``)."""
        return list(run_reversible(
            self.columns[start:end + 1], source, None if state is None else tuple(state),
            None if drop_scales is None else drop_scales[start:end + 1], hw, counts[start:end + 1],
            retain_last_graph=last and self.retain_last_graph))

    def forward_levels(self, x: Tensor, run: Optional[Tuple[List[int], List[int]]] = None
                       ) -> Tuple[List[Tensor], List[Tensor]]:
        """The newest value of every level, level 0 first, as tokens (B, N, D) and as maps
        (B, D, H/p, W/p): the maps are views made by ``level_maps``, where timm's hook and fx
        feature extractors read them.

        The newest value of level ``l`` is the one computed by the last column that builds
        it: with ``out_levels='all'`` the last column's levels; in a classifier, the top level
        of the last TD column and the lower ones from the columns before. ``run``: (counts,
        ends) of :meth:`revcolv2.plan.ColumnPlan.newest_run`; default: every built level.
        """
        counts, ends = self._newest_run if run is None else run
        states, hw = self.run_columns(x, counts, ends)
        newest: List[Optional[Tensor]] = [None for _l in range(self.num_levels)]
        for state in states:  # a later column's value of a level is the newer one
            for l, t in enumerate(state):
                if t is not None:
                    newest[l] = t
        tokens: List[Tensor] = []
        maps: List[Tensor] = []
        for l, to_map in enumerate(self.level_maps):
            t = newest[l]
            assert t is not None  # the BU columns compute every level
            tokens.append(t)
            maps.append(to_map(t, hw))
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

    def forward_columns(
        self, x: Tensor, visible_ids: Optional[Tensor] = None, mask_token: Optional[Tensor] = None,
        td_levels: Optional[Sequence[int]] = None,
    ) -> Tuple[State, Optional[State], Tuple[int, int]]:
        """Run the columns; returns (last BU state, last TD state, token grid). With
        ``visible_ids`` (B, Nv) the BU columns see only those tokens; at the hand-off each level
        (and the patch tokens that feed the TD columns) is scattered back to full length with
        ``mask_token`` + position embedding at the masked positions.

        ``td_levels``: the levels of the last TD column the caller reads (None: every level
        the model builds). Only the levels they depend on run, in forward and backward; the
        others come back as ``None``. ``()`` skips the TD columns (the TD state is then
        None). Outputs that do run are identical, drop-path draws included. A level the
        model does not build is a ``ValueError``.
        """
        if td_levels is not None and self.num_td_columns:
            self.plan.check_built(td_levels)
        if visible_ids is not None and mask_token is None:
            raise ValueError("masked forward needs a mask_token")
        counts, ends = self.plan.columns_run(td_levels)
        states, hw = self.run_columns(x, counts, ends, visible_ids, mask_token)
        bu = tuple(states[0])
        if td_levels is not None and len(td_levels) == 0:
            return bu, None, hw
        if not self.num_td_columns:  # no TD column: the TD state is the BU state, handed off if masked
            if visible_ids is None:
                return bu, bu, hw
            fill = mask_token + sincos_pos_embed_2d(hw[0], hw[1], self.embed_dim, x.device, bu[0].dtype)
            return bu, tuple(hand_off(t, visible_ids, fill) for t in bu), hw
        return bu, tuple(states[-1]), hw

    def forward_bottom_up(self, x: Tensor) -> List[Tensor]:
        """Levels of the last bottom-up column, each (B, N, D), level 0 first. Only the BU
        columns run: the linear probe's path (its head sits on the top BU level)."""
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
        :meth:`forward_levels`): the levels of the last column for a model built with
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
        run = None
        if stop_early:  # the last column runs up to the lowest level asked for
            wanted = set(take_indices) | (set() if intermediates_only else {self.num_levels - 1})
            run = self.plan.newest_run(self.plan.stop_early_count(wanted))
        tokens, maps = self.forward_levels(x, run)
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
        from_last = [l for l in take_indices if l in self.plan.built_levels(self.plan.num_columns - 1)]
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


def compile_for_training(module: nn.Module, **compile_kwargs) -> List[str]:
    """``torch.compile`` a model for training, in place (its ``state_dict`` keys, and so its
    checkpoints, do not change); what ``--compile`` and detectron2's ``train.compile`` do.

    - A reversible RevColV2 inside ``module``: :meth:`RevColV2.compile_levels` (the reversible
      engine is an autograd function that rebuilds activations in backward, which dynamo
      cannot trace; each level's F_l is compiled instead, and the engine runs them). This
      needs the recompile limit raised first, a process-wide switch that the program sets
      where it starts: :func:`allow_level_recompiles`.
    - Otherwise ``module`` as a whole (``nn.Module.compile``): a plain RevColV2, the MIM
      model, a linear probe on its frozen backbone.

    Compile after copying the model (an EMA copy made later would share the compiled call of
    the original). Compilation happens at the first forward. Returns one line per compiled
    part, for the log.
    """
    reversible = [m for m in module.modules() if isinstance(m, RevColV2) and m.reversible]
    if reversible:
        for m in reversible:
            m.compile_levels(**compile_kwargs)
        return [f"{type(m).__name__} (reversible): compile_levels(), each level's F_l" for m in reversible]
    module.compile(**compile_kwargs)
    return [f"{type(module).__name__}: torch.compile of the whole module"]


def _cfg(**kwargs) -> dict:
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875,
                interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0", **kwargs)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: RevColV2) -> Dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: unwrap the checkpoint and leave out what ``model`` does
    not hold: the pre-training-only tensors (mask token, reconstruction head), the levels it
    does not build (``model.plan.pruned_prefixes()``) and, in a model without one, the
    classifier norm. Whatever is left out is logged; everything else must match the model."""
    sd = unwrap_state_dict(state_dict)
    absent = PRETRAIN_ONLY_PREFIXES + model.plan.pruned_prefixes()
    if isinstance(model.fc_norm, nn.Identity):
        absent += ("fc_norm.",)
    held = {k: v for k, v in sd.items() if not k.startswith(absent)}
    if len(held) < len(sd):
        _logger.info("left out %d checkpoint tensors this model does not hold: %s",
                     len(sd) - len(held), ", ".join(k for k in sd if k not in held))
    return held


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
