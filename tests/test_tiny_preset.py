"""One tiny preset for the pre-training demo and the detectron2 demos: the checkpoint that
``configs/pretrain/revcolv2_tiny_demo.yaml`` trains loads through ``train.init_checkpoint``
of every demo config as written, and a checkpoint of another size is an error that names
the config overrides (different keys per config) that build its size."""
import os
import re

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from training_helpers import REPO

from revcolv2.checkpoint import ShapeMismatchError
from revcolv2.cli.common import build_model
from revcolv2.config import load_config
from revcolv2.mim import create_mim_model
from revcolv2_d2.checkpoint import RevColV2Checkpointer
from revcolv2_d2.train_net import apply_overrides

pytestmark = pytest.mark.usefixtures("single_thread")

PRETRAIN_DEMO = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
DEMOS = {  # demo config -> the config key of its RevColV2Backbone
    "mask_rcnn_revcolv2_tiny_shapes.py": "model.backbone.bottom_up",
    "upernet_revcolv2_tiny_synthetic.py": "model.backbone",
    "mask2former_revcolv2_tiny_synthetic.py": "model.backbone",
}
DROPPED = ("mask_token", "decoder_", "head.", "fc_norm.")


def demo_config(name, overrides=()):
    cfg = LazyConfig.load(os.path.join(REPO, "projects", "RevColV2", "configs", "demo", name))
    return apply_overrides(cfg, list(overrides))


def mim_checkpoint(path, recipe, **kwargs):
    """A checkpoint as tools/pretrain.py writes it: the weights and the resolved recipe."""
    torch.manual_seed(0)
    model = build_model(recipe, "pretrain") if not kwargs else create_mim_model("revcolv2_tiny", **kwargs)
    torch.save({"model": model.state_dict(), "config": recipe, "epoch": 8}, path)
    return model.state_dict()


def load(cfg, path):
    model = instantiate(cfg.model)
    RevColV2Checkpointer(model).load(str(path))
    return model


@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_the_pretraining_demo_checkpoint_loads_into_every_demo_config_as_written(demo, tmp_path):
    recipe = load_config(PRETRAIN_DEMO)
    assert recipe["model"]["name"] == "revcolv2_tiny" and not recipe["model"]["kwargs"]  # the preset as it is
    path = tmp_path / "checkpoint-0008.pth"
    weights = mim_checkpoint(path, recipe)
    model = load(demo_config(demo), path)
    prefix = DEMOS[demo][len("model."):] + ".net."
    own = model.state_dict()
    for name, value in weights.items():
        if not name.startswith(DROPPED):
            torch.testing.assert_close(own[prefix + name], value, msg=name)


@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_another_size_names_the_overrides_of_this_config_and_they_work(demo, tmp_path):
    recipe = load_config(PRETRAIN_DEMO, ["model.kwargs={embed_dim: 32, num_heads: 2}"])
    path = tmp_path / "narrow.pth"
    mim_checkpoint(path, recipe)
    key = DEMOS[demo]
    with pytest.raises(ValueError, match="different model size") as e:
        load(demo_config(demo), path)
    message = str(e.value)
    assert "patch_embed.proj.weight" in message  # the tensor, as before
    assert isinstance(e.value, ShapeMismatchError) and e.value.source == str(path) and e.value.from_recipe
    overrides = re.search(r"add the config overrides: (.*)$", message).group(1).split()
    assert overrides == [f"{key}.embed_dim=32", f"{key}.num_heads=2"]
    model = load(demo_config(demo, overrides), path)  # the named overrides are the fix
    assert model.get_submodule(key[len("model."):]).net.embed_dim == 32


def test_a_recipe_with_other_heads_is_an_error_though_no_shape_differs(tmp_path):
    recipe = load_config(PRETRAIN_DEMO, ["model.kwargs={num_heads: 6}"])
    path = tmp_path / "six_heads.pth"
    mim_checkpoint(path, recipe)
    with pytest.raises(ValueError, match=rf"{path}: the checkpoint is for a different model size.*"
                                         r"add the config overrides: model\.backbone\.num_heads=6$"):
        load(demo_config("upernet_revcolv2_tiny_synthetic.py"), path)


def test_without_a_recipe_the_tensors_give_the_width(tmp_path):
    path = tmp_path / "raw.pth"
    torch.manual_seed(0)
    torch.save(create_mim_model("revcolv2_tiny", embed_dim=64, num_heads=2).state_dict(), path)
    with pytest.raises(ShapeMismatchError, match=r"backbone\.net\.patch_embed\.proj\.weight.*different model "
                                                 r"size.*from its tensors.*model\.backbone\.embed_dim=64 \(plus "
                                                 r"num_heads as in pre-training") as e:
        load(demo_config("upernet_revcolv2_tiny_synthetic.py"), path)
    assert not e.value.from_recipe  # the tensors do not give the heads: --eval-only also points at the run's config
