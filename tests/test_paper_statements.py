"""The paper's statements about RevColV2, tested as statements (perturbation and gradient
tests on a tiny model, plain autograd).

- "classification uses the top level features": the logits depend on the top level of the
  last top-down (TD) column and on nothing that cannot reach it;
- the TD columns "reconstruct the unseen raw patches at the lowest level of the last
  column": the reconstruction reads level 0 of the last TD column;
- the TD columns receive the bottom-up (BU) outputs "together with the mask tokens": masked
  positions hold mask token + position embedding, visible positions the BU outputs;
- linear probing puts its head on "the last level of the bottom-up columns".

Everything is observed through hooks on the modules (``model.columns[j]``, its
``levels[l]``, ``model.decoder_norm``), not through private attributes, so the tests hold
whatever engine runs the columns.
"""
import pytest
import timm
import torch

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.classification import LinearProbe
from revcolv2.mim import create_mim_model, random_masking

# 2 BU + 2 TD columns: with two TD columns, some TD levels cannot reach the classifier
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)
LEVELS = 4


pytestmark = pytest.mark.usefixtures("single_thread")


def classifier(num_td_columns=1, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("revcolv2_tiny", num_classes=5, reversible=False, num_td_columns=num_td_columns,
                             **TINY, **kwargs).eval()


def mim(num_td_columns=1):
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", reversible=False, num_td_columns=num_td_columns, **TINY).eval()
    with torch.no_grad():  # a mask token far from zero, so that "mask token + pos" is unmistakable
        model.mask_token.normal_(std=1.0)
    return model


def images(n=2, seed=0):
    return torch.randn(n, 3, 32, 48, generator=torch.Generator().manual_seed(seed))  # 4x6 tokens


def perturb_output(module, index=None, scale=1.0):
    """Forward hook adding noise to a module's output (or to element ``index`` of a tuple)."""
    g = torch.Generator().manual_seed(123)

    def hook(mod, inp, out):
        if index is None:
            return out + scale * torch.randn(out.shape, generator=g)
        out = list(out)
        out[index] = out[index] + scale * torch.randn(out[index].shape, generator=g)
        return tuple(out)

    return module.register_forward_hook(hook)


def capture(module, store, key, pre=False):
    if pre:
        return module.register_forward_pre_hook(
            lambda mod, args, kwargs: store.__setitem__(key, (args, kwargs)), with_kwargs=True)
    return module.register_forward_hook(lambda mod, inp, out: store.__setitem__(key, out))


def ancestors_of_top_level(num_bu: int, num_td: int, levels: int = LEVELS):
    """(column, level) pairs whose update can reach the top level of the last column.

    From the reversible unit c_l(j) = alpha * c_l(j-1) + F_l(in, cross): ``in`` is the level
    updated just before in column j (BU: l-1, TD: l+1), ``cross`` the previous column's
    level above (BU) or below (TD).
    """
    def direction(j):
        return "up" if j < num_bu else "down"

    def parents(j, l):
        up = direction(j) == "up"
        out = []
        before = l - 1 if up else l + 1
        if 0 <= before < levels:
            out.append((j, before))
        if j > 0:
            out.append((j - 1, l))  # alpha * c_l(j-1)
            cross = l + 1 if up else l - 1
            if 0 <= cross < levels:
                out.append((j - 1, cross))
        return out

    last = num_bu + num_td - 1
    seen, todo = set(), [(last, levels - 1)]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(parents(*node))
    return seen


# ------------------------------------------------------------------ classification
@pytest.mark.parametrize("num_td_columns", [1, 2])
def test_logits_change_with_the_top_level_of_the_last_td_column_only(num_td_columns):
    model = classifier(num_td_columns)
    x = images()
    with torch.no_grad():
        base = model(x)
        last = model.columns[-1]
        for level in range(LEVELS):
            handle = perturb_output(last.levels[level])
            out = model(x)
            handle.remove()
            if level == LEVELS - 1:
                assert (out - base).abs().max() > 1e-2, "the classifier ignores the top level of the last TD column"
            else:
                # the TD column updates its top level first: lower levels come after it
                assert torch.equal(out, base), f"the classifier reads level {level} of the last TD column"


@pytest.mark.parametrize("num_td_columns", [1, 2])
def test_logit_gradients_reach_exactly_the_levels_upstream_of_the_top_level(num_td_columns):
    model = classifier(num_td_columns)
    model(images()).sum().backward()
    reach = ancestors_of_top_level(model.num_bu_columns, model.num_td_columns)
    assert len(reach) < len(model.columns) * LEVELS  # some levels cannot reach it
    for j, column in enumerate(model.columns):
        for l, level in enumerate(column.levels):
            grads = [p.grad for p in level.parameters()]
            nonzero = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert nonzero == ((j, l) in reach), (
                f"column {j} level {l}: gradient {'present' if nonzero else 'absent'}, expected "
                f"{'present' if (j, l) in reach else 'absent'}")
        if column.alphas is not None:
            rows = column.alphas.grad.abs().sum(dim=1) > 0
            assert rows.tolist() == [(j, l) in reach for l in range(LEVELS)], f"column {j} alphas"
    for name in ("patch_embed.proj.weight", "fc_norm.weight", "head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


@pytest.mark.parametrize("num_td_columns", [1, 2])
def test_the_classifier_builds_exactly_the_levels_upstream_of_the_top_level(num_td_columns):
    """Derived from the reversible unit alone (``ancestors_of_top_level``), not from the model."""
    model = classifier(num_td_columns)
    reach = ancestors_of_top_level(model.num_bu_columns, model.num_td_columns)
    built = {(j, l) for j in range(len(model.columns)) for l in range(LEVELS)} - set(model.plan.pruned_levels())
    assert built == reach
    assert all(any(True for _ in model.columns[j].levels[l].parameters()) == ((j, l) in reach)
               for j in range(len(model.columns)) for l in range(LEVELS))


def test_feature_maps_for_dense_heads_are_the_last_td_columns_levels():
    """With every level built (dense heads, features_only), forward_intermediates returns
    the last TD column's state, level 0 first, and forward_features its top level."""
    model = classifier(out_levels="all")
    store = {}
    capture(model.columns[-1], store, "td")
    with torch.no_grad():
        feats = model.forward_intermediates(images(), intermediates_only=True, output_fmt="NLC")
    assert len(feats) == LEVELS
    assert all(torch.equal(f, t) for f, t in zip(feats, store["td"]))
    with torch.no_grad():
        top = model.forward_features(images())
    assert torch.equal(top, feats[-1])


# ------------------------------------------------------------------ pre-training
def test_reconstruction_reads_level_0_of_the_last_td_column():
    model = mim()
    x = images()
    visible_ids, _ = random_masking(2, 24, 0.75, generator=torch.Generator().manual_seed(0))
    store = {}
    capture(model.columns[-1], store, "td")
    capture(model.decoder_norm, store, "decoder_in", pre=True)
    with torch.no_grad():
        base = model(x, visible_ids=visible_ids)["pred"]
    (decoder_in,), _ = store["decoder_in"]
    assert torch.equal(decoder_in, store["td"][0])
    for level in range(LEVELS):
        # perturb the state the last column hands on, after it has been computed
        handle = perturb_output(model.columns[-1], index=level)
        with torch.no_grad():
            pred = model(x, visible_ids=visible_ids)["pred"]
        handle.remove()
        if level == 0:
            assert (pred - base).abs().max() > 1e-2
        else:
            assert torch.equal(pred, base), f"the reconstruction reads level {level}"


@pytest.mark.parametrize("num_td_columns", [1, 2])
def test_td_columns_get_bu_outputs_at_visible_and_mask_token_plus_position_at_masked_positions(num_td_columns):
    model = mim(num_td_columns)
    nb = model.num_bu_columns
    x = images()
    visible_ids, mask = random_masking(2, 24, 0.75, generator=torch.Generator().manual_seed(1))
    masked = mask.bool()
    store = {}
    capture(model.columns[nb - 1], store, "bu")
    capture(model.columns[nb], store, "td_in", pre=True)
    with torch.no_grad():
        model(x, visible_ids=visible_ids)
        tokens, pos, _ = model.embed(x)  # patch tokens + position embedding, and the embedding
    args, kwargs = store["td_in"]
    source, prev = args[0], args[1] if len(args) > 1 else kwargs["prev"]
    fill = (model.mask_token + pos).expand(2, -1, -1)  # (B, N, D)
    assert len(prev) == LEVELS
    for name, t in [("source", source)] + [(f"level {l}", prev[l]) for l in range(LEVELS)]:
        assert t.shape == tokens.shape, name
        torch.testing.assert_close(t[masked], fill[masked], rtol=0, atol=1e-6,
                                   msg=lambda m: f"masked positions of the TD input ({name}): {m}")
    # visible positions: the visible patch tokens (the TD source) and the last BU state
    d = tokens.shape[-1]
    gather = lambda t: t.gather(1, visible_ids[..., None].expand(-1, -1, d))  # noqa: E731
    torch.testing.assert_close(gather(source), gather(tokens), rtol=0, atol=1e-6)
    for l in range(LEVELS):
        assert store["bu"][l].shape == (2, visible_ids.shape[1], d)  # the BU columns saw only visible tokens
        torch.testing.assert_close(gather(prev[l]), store["bu"][l], rtol=0, atol=0)


def test_mask_token_position_embedding_is_the_tokens_own():
    """Two masked positions get different inputs (their position embeddings differ), and
    the reconstruction of a masked patch depends on the mask token."""
    model = mim()
    nb = model.num_bu_columns
    visible_ids, mask = random_masking(1, 24, 0.75, generator=torch.Generator().manual_seed(2))
    store = {}
    capture(model.columns[nb], store, "td_in", pre=True)
    out = model(images(1), visible_ids=visible_ids)
    source = store["td_in"][0][0][0]  # (N, D)
    holes = source[mask[0].bool()]
    assert len({tuple(r.tolist()) for r in holes}) == holes.shape[0]
    (out["pred"] * mask[..., None]).sum().backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_fine_tuning_hand_off_is_the_identity():
    """Without masking the first TD column starts from the last BU state and the patch tokens."""
    model = classifier()
    nb = model.num_bu_columns
    store = {}
    capture(model.columns[nb - 1], store, "bu")
    capture(model.columns[nb], store, "td_in", pre=True)
    x = images()
    with torch.no_grad():
        model(x)
        tokens, _, _ = model.embed(x)
    args, kwargs = store["td_in"]
    prev = args[1] if len(args) > 1 else kwargs["prev"]
    assert torch.equal(args[0], tokens)
    assert all(torch.equal(p, b) for p, b in zip(prev, store["bu"]))


# ------------------------------------------------------------------ linear probing
def test_linear_probe_reads_the_last_bu_level_and_runs_no_td_column():
    backbone = classifier()
    probe = LinearProbe(backbone, 4).eval()
    nb = backbone.num_bu_columns
    store = {}
    capture(backbone.columns[nb - 1], store, "bu")
    td_calls = []
    backbone.columns[nb].register_forward_hook(lambda *a: td_calls.append(1))
    x = images()
    base = probe.features(x)
    torch.testing.assert_close(base, store["bu"][-1].mean(1), rtol=0, atol=0)
    assert not td_calls
    for level in range(LEVELS):
        handle = perturb_output(backbone.columns[nb - 1], index=level)
        feats = probe.features(x)
        handle.remove()
        if level == LEVELS - 1:
            assert (feats - base).abs().max() > 1e-2
        else:
            assert torch.equal(feats, base), f"the linear probe reads BU level {level}"


def test_ancestor_rule_on_a_hand_checked_case():
    """1 BU + 1 TD column: the TD top level is reached from every BU level (the BU top is
    computed last, from all of them) and from no other TD level."""
    reach = ancestors_of_top_level(1, 1)
    assert reach == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 3)}
