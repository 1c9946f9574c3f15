"""RevColV2 written out from its parameters: the independent reference of the model's code paths.

Every formula here reads a module's parameters (``block.norm1.weight``, ``column.alphas``,
...) and none of the model's code: LayerNorm as (x - mean) / sqrt(var + eps) * w + b,
attention as softmax(q k^T / sqrt(d)) v with q, k, v the thirds of the qkv projection (head
by head), windows by explicit loops over a zero-padded grid, GELU by erf, the column update
``c_l = alpha_l * c_l(prev) + F_l(in, cross)`` with the wiring of docs/ARCHITECTURE.md
(bottom-up: levels 0 -> L-1, ``in`` the level below, ``cross`` the previous column's level
above; top-down: L-1 -> 0, ``in`` the level above, ``cross`` the level below), alpha's
magnitude at least ``ALPHA_MIN`` with its sign (+ at 0), drop path as a per-sample factor
of each residual branch (execution order: column by column, levels in update order, blocks
in order), the MIM hand-off as an explicit scatter.

Run in float64 on parameters from ``training_helpers.randomize_parameters``, it is what the
plain path, the reversible engine, the bf16 norms, the fused residual and the compiled,
traced and exported paths are compared against (``test_reference_formulas.py``).
"""
import math
from typing import List, Optional

import torch

EPS = 1e-6  # every LayerNorm of the model (ViT / MAE)
ALPHA_MIN = 1e-3


def layer_norm(x, weight, bias, eps=EPS):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def linear(x, lin):
    y = x @ lin.weight.t().to(x.dtype)
    return y if lin.bias is None else y + lin.bias.to(x.dtype)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def attention(x, attn, heads):
    """Global attention with ``heads`` heads (the model's configuration, not the module's
    attribute) over the tokens of ``x`` (B, N, D)."""
    b, n, d = x.shape
    dh = d // heads
    qkv = linear(x, attn.qkv)
    outs = []
    for h in range(heads):
        q = qkv[..., h * dh:(h + 1) * dh]
        k = qkv[..., d + h * dh:d + (h + 1) * dh]
        v = qkv[..., 2 * d + h * dh:2 * d + (h + 1) * dh]
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        outs.append(w @ v)
    return linear(torch.cat(outs, dim=-1), attn.proj)


def windowed_attention(x, attn, hw, ws, heads):
    """Attention within ws x ws windows of the (H, W) grid, zero-padded at the bottom and
    right to multiples of ``ws`` (the padded tokens take part, as in ViTDet)."""
    b, n, d = x.shape
    h, w = hw
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    grid = torch.zeros(b, hp, wp, d, dtype=x.dtype)
    grid[:, :h, :w] = x.reshape(b, h, w, d)
    rows = []
    for r in range(0, hp, ws):
        cols = []
        for c in range(0, wp, ws):
            win = grid[:, r:r + ws, c:c + ws].reshape(b, ws * ws, d)
            cols.append(attention(win, attn, heads).reshape(b, ws, ws, d))
        rows.append(torch.cat(cols, dim=2))
    return torch.cat(rows, dim=1)[:, :h, :w].reshape(b, n, d)


def mlp(x, m):
    return linear(gelu(linear(x, m.fc1)), m.fc2)


def _per_sample(scale, x):
    return 1.0 if scale is None else scale.to(x.dtype).view(-1, 1, 1)


def block(blk, x, scales=None, hw=None, heads=2):
    """A pre-norm ViT block: x + s_a * gamma1 * attn(LN1(x)), then + s_m * gamma2 * mlp(LN2(.)).
    ``scales`` (B, 2): the drop-path factors of the attention and the MLP branch."""
    y = layer_norm(x, blk.norm1.weight.to(x.dtype), blk.norm1.bias.to(x.dtype))
    if blk.window_size and hw:
        a = windowed_attention(y, blk.attn, hw, blk.window_size, heads)
    else:
        a = attention(y, blk.attn, heads)
    if blk.gamma1 is not None:
        a = a * blk.gamma1.to(x.dtype)
    x = x + _per_sample(None if scales is None else scales[:, 0], x) * a
    y = layer_norm(x, blk.norm2.weight.to(x.dtype), blk.norm2.bias.to(x.dtype))
    m = mlp(y, blk.mlp)
    if blk.gamma2 is not None:
        m = m * blk.gamma2.to(x.dtype)
    return x + _per_sample(None if scales is None else scales[:, 1], x) * m


def fusion(fus, cross):
    if fus.variant != "linear":
        return cross
    return linear(layer_norm(cross, fus.norm.weight.to(cross.dtype), fus.norm.bias.to(cross.dtype)), fus.proj)


def level(lvl, inp, cross, scales=None, hw=None, heads=2):
    """F_l: ``inp + fusion(cross)`` (no fusion without a cross input), then the blocks;
    ``scales`` (B, blocks, 2)."""
    x = inp if cross is None else inp + fusion(lvl.fusion, cross)
    for b, blk in enumerate(lvl.blocks):
        x = block(blk, x, None if scales is None else scales[:, b], hw, heads)
    return x


def clamped_alpha(a):
    """alpha with magnitude at least ALPHA_MIN and its sign (+ALPHA_MIN at 0)."""
    floor = torch.where(a < 0, -ALPHA_MIN, ALPHA_MIN).to(a.dtype)
    return torch.where(a.abs() >= ALPHA_MIN, a, floor)


def pos_embed(h, w, dim):
    """2-D sin-cos: [sin(r w_i), cos(r w_i), sin(c w_i), cos(c w_i)], w_i = 10000^(-i/(dim/4)), row-major."""
    quarter = dim // 4
    omega = [10000.0 ** (-i / quarter) for i in range(quarter)]
    rows = []
    for r in range(h):
        for c in range(w):
            rows.append([math.sin(r * o) for o in omega] + [math.cos(r * o) for o in omega]
                        + [math.sin(c * o) for o in omega] + [math.cos(c * o) for o in omega])
    return torch.tensor(rows, dtype=torch.float64).unsqueeze(0)


def embed(model, x):
    """Patch tokens + position, (B, N, D) float64, and the grid."""
    pe = model.patch_embed.proj
    p = model.patch_size
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
    tokens = patches @ pe.weight.reshape(pe.weight.shape[0], -1).t().to(x.dtype) + pe.bias.to(x.dtype)
    pos = pos_embed(h // p, w // p, tokens.shape[-1]).to(x.dtype)
    return tokens + pos, pos, (h // p, w // p)


def scatter_back(t, visible_ids, fill):
    """(B, Nv, D) visible tokens -> (B, N, D): ``fill`` everywhere, then row i of sample b at visible_ids[b, i]."""
    out = fill.expand(t.shape[0], -1, -1).clone()
    for b in range(t.shape[0]):
        out[b, visible_ids[b]] = t[b]
    return out


def columns(model, x, drop_scales=None, visible_ids=None, mask_token=None, heads=2
            ) -> List[List[Optional[torch.Tensor]]]:
    """The state of every column (L levels each; None for a level the model does not build).
    ``drop_scales`` (columns, B, blocks per column, 2) as ``RevColV2.draw_drop_scales`` draws
    them; ``heads``: the attention heads the model was configured with."""
    nb, L, bpl = model.num_bu_columns, model.num_levels, model.blocks_per_level
    tokens, pos, hw = embed(model, x)
    source = tokens if visible_ids is None else torch.stack([tokens[b, visible_ids[b]] for b in range(len(x))])
    states: List[List[Optional[torch.Tensor]]] = []
    prev: Optional[List[Optional[torch.Tensor]]] = None
    for j, col in enumerate(model.columns):
        if visible_ids is not None and j == nb:  # the MIM hand-off
            fill = mask_token.to(x.dtype) + pos
            source = scatter_back(source, visible_ids, fill)
            prev = [scatter_back(t, visible_ids, fill) for t in prev]
        grid = hw if visible_ids is None or j >= nb else None
        up = j < nb
        order = list(range(L)) if up else list(range(L - 1, -1, -1))
        new: List[Optional[torch.Tensor]] = [None] * L
        for pos_in_order, l in enumerate(order):
            lvl = col.levels[l]
            if not hasattr(lvl, "blocks"):  # a level the model does not build
                break
            inp = source if pos_in_order == 0 else new[order[pos_in_order - 1]]
            c = l + 1 if up else l - 1
            cross = prev[c] if prev is not None and 0 <= c < L else None
            scales = None
            if drop_scales is not None:
                scales = drop_scales[j][:, pos_in_order * bpl:(pos_in_order + 1) * bpl]
            f = level(lvl, inp, cross, scales, grid, heads)
            new[l] = f if prev is None else clamped_alpha(col.alphas[l].to(x.dtype)) * prev[l] + f
        states.append(new)
        prev = new
    return states


def newest_levels(states):
    """The newest value of every level: the last column that computed it."""
    newest = [None] * len(states[0])
    for state in states:
        for l, t in enumerate(state):
            if t is not None:
                newest[l] = t
    return newest


def classifier_logits(model, x, drop_scales=None, heads=2):
    top = newest_levels(columns(model, x, drop_scales, heads=heads))[-1]
    pooled = top.mean(dim=1)
    if hasattr(model.fc_norm, "weight"):
        pooled = layer_norm(pooled, model.fc_norm.weight.to(x.dtype), model.fc_norm.bias.to(x.dtype))
    return linear(pooled, model.head) if hasattr(model.head, "weight") else pooled


def patch_targets(x, p, normalise=True):
    """(B, 3, H, W) -> (B, N, p*p*3) patches in raster order, pixels (row, column, channel);
    ``normalise``: each patch minus its mean, over sqrt(unbiased variance + 1e-6) (MAE)."""
    b, c, h, w = x.shape
    target = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
    if normalise:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    return target


def mim_outputs(model, x, visible_ids, drop_scales=None, heads=2):
    """(prediction (B, N, p*p*3), loss) of the MIM model: the decoder on level 0 of the last TD
    column; the loss is the mean over masked patches of the per-patch MSE against the
    patch's pixels, each patch normalised by its mean and sqrt(var + 1e-6) when ``norm_pix_loss``."""
    states = columns(model, x, drop_scales, visible_ids, model.mask_token, heads)
    td0 = states[-1][0]
    pred = linear(layer_norm(td0, model.decoder_norm.weight.to(x.dtype), model.decoder_norm.bias.to(x.dtype)),
                  model.decoder_pred)
    p = model.patch_size
    b, c, h, w = x.shape
    target = patch_targets(x, p, model.norm_pix_loss)
    mask = torch.ones(b, (h // p) * (w // p), dtype=x.dtype)
    for i in range(b):
        mask[i, visible_ids[i]] = 0
    per_patch = ((pred - target) ** 2).mean(-1)
    return pred, (per_patch * mask).sum() / mask.sum()
