"""Mask2Former head + RevColV2Mask2Former: training/inference contract, matcher, semantic
inference, images without labels, the evaluation oracle, clipping and import isolation."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.evaluation import SemSegEvaluator
from PIL import Image
from torch import nn

from revcolv2_d2.backbone import RevColV2Backbone
from revcolv2_d2.mask2former import (
    FullModelGradClipAdamW,
    Mask2FormerHead,
    RevColV2Mask2Former,
    sem_seg_to_targets,
    semantic_inference,
)
from revcolv2_d2.upernet import revcolv2_level_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 5
DIM = 32
QUERIES = 8
DECODER_LAYERS = 3
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def make_head(dim=DIM, **kw):
    args = dict(num_classes=NUM_CLASSES, conv_dim=32, mask_dim=32, hidden_dim=32, num_queries=QUERIES, num_heads=2,
                encoder_layers=1, encoder_feedforward_dim=64, decoder_layers=DECODER_LAYERS, dim_feedforward=64,
                train_num_points=256)
    args.update(kw)
    return Mask2FormerHead(revcolv2_level_shapes("revcolv2_tiny", embed_dim=dim, num_heads=2), **args)


def make_model(head_dim=DIM, **head_kw):
    torch.manual_seed(0)
    backbone = RevColV2Backbone("revcolv2_tiny", window_size=0, embed_dim=DIM, num_heads=2)
    return RevColV2Mask2Former(backbone=backbone, sem_seg_head=make_head(head_dim, **head_kw), pixel_mean=MEAN,
                               pixel_std=STD)


def batch(n=2, h=64, w=96, seed=0, empty=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        label = torch.randint(0, NUM_CLASSES, (h, w), generator=g)
        label[: h // 4] = 255  # an ignored band
        if i in empty:
            label[:] = 255
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "sem_seg": label})
    return out


@pytest.mark.slow
def test_forward_shapes_and_every_parameter_gets_a_gradient():
    model = make_model().train()
    inputs = batch()
    features = model.backbone(model.preprocess(inputs).tensor)
    class_logits, mask_logits = model.sem_seg_head.layers(features)
    # the initial prediction + one per masked-attention layer
    assert len(class_logits) == len(mask_logits) == DECODER_LAYERS + 1
    assert class_logits[-1].shape == (2, QUERIES, NUM_CLASSES + 1)
    assert mask_logits[-1].shape == (2, QUERIES, 64 // 4, 96 // 4)  # stride 4 of the padded input

    losses = model(inputs)
    names = {"loss_cross_entropy", "loss_mask", "loss_dice"}
    expected = names | {f"{n}_{i}" for n in names for i in range(DECODER_LAYERS)}  # deep supervision
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    # Deformable attention starts with zero sampling-offset and attention-weight projections
    # (Deformable DETR's init), so the level embeddings added to their input get an exactly
    # zero gradient at the first step only.
    assert zero == ["sem_seg_head.pixel_decoder.level_embed"], zero
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    sum(model(inputs).values()).backward()
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()]
    assert not zero, zero
    head_params = [n for n, _ in model.sem_seg_head.named_parameters()]
    assert any(n.startswith("pixel_decoder.encoder") for n in head_params)  # the deformable encoder is there
    assert any(n.startswith("transformer.decoder.layers") for n in head_params)


def test_loss_weights_are_applied():
    model = make_model().train()
    inputs = batch()
    torch.manual_seed(1)
    base = model(inputs)
    model.sem_seg_head.weight_dict = {"loss_cross_entropy": 1.0, "loss_mask": 1.0, "loss_dice": 1.0}
    torch.manual_seed(1)  # the same sampled points
    unit = model(inputs)
    for key, value in base.items():
        weight = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}[key.rstrip("_0123456789")]
        torch.testing.assert_close(value, weight * unit[key], msg=key)


def test_targets_are_one_mask_per_class_present_with_ignore_as_negative():
    sem_seg = torch.tensor([[0, 0, 3], [255, 3, 3]])
    t = sem_seg_to_targets(sem_seg, 255)
    assert t["labels"].tolist() == [0, 3]
    assert t["masks"].tolist() == [[[1, 1, 0], [0, 0, 0]], [[0, 0, 1], [0, 1, 1]]]
    empty = sem_seg_to_targets(torch.full((4, 5), 255), 255)
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, 4, 5)


def test_the_padding_of_a_smaller_image_is_no_class_in_its_targets():
    """An image smaller than the padded batch: its per-class masks cover its own labelled
    pixels and nothing of the padding (which is neither class 0 nor any other class)."""
    model = make_model().train()
    small = torch.zeros(32, 48, dtype=torch.long)  # classes 0 and 2, no ignored pixel
    small[:, 20:] = 2
    inputs = [{"image": torch.full((3, 32, 48), 128.0), "sem_seg": small}] + batch(1, 64, 96)
    seen = {}
    model.sem_seg_head.register_forward_pre_hook(lambda m, args: seen.__setitem__("targets", args[1]))
    model(inputs)
    t = seen["targets"][0]
    assert t["labels"].tolist() == [0, 2]
    assert t["masks"].shape == (2, 64, 96)  # the padded batch
    expected = torch.zeros(2, 64, 96)
    expected[0, :32, :20] = 1
    expected[1, :32, 20:48] = 1
    assert t["masks"][:, 32:].sum() == 0 and t["masks"][:, :, 48:].sum() == 0, (
        f"padding pixels in the masks of classes {t['labels'].tolist()}: "
        f"{[int(m.sum() - m[:32, :48].sum()) for m in t['masks']]}")
    assert torch.equal(t["masks"], expected)


@pytest.mark.slow
def test_images_without_labelled_pixels_train_with_a_counted_warning(caplog):
    model = make_model().train()
    with caplog.at_level(logging.WARNING, logger="revcolv2_d2.mask2former"):
        mixed = model(batch(empty=(1,)))
        sum(mixed.values()).backward()
        assert all(torch.isfinite(v) for v in mixed.values())
        model.zero_grad()
        only_empty = model(batch(empty=(0, 1)))
    assert "1 image(s) in this batch have no labelled pixel" in caplog.text
    assert "(3 such images so far)" in caplog.text
    # nothing to match: all queries learn "no object", the mask losses are zero but connected
    assert all(only_empty[k] == 0 for k in only_empty if not k.startswith("loss_cross_entropy"))
    assert all(only_empty[k] > 0 for k in only_empty if k.startswith("loss_cross_entropy"))
    sum(only_empty.values()).backward()
    assert model.sem_seg_head.class_predictor.weight.grad.abs().sum() > 0


def test_matcher_assigns_the_right_queries_on_two_masks():
    """Two targets (left half class 1, right half class 3); query 2 predicts the left half
    as class 1, query 0 the right half as class 3, query 1 says no object over everything."""
    head = make_head()
    h, w = 16, 16
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    right = 1 - left
    masks = torch.full((1, 3, h, w), -8.0)
    masks[0, 0] = right * 16 - 8
    masks[0, 2] = left * 16 - 8
    masks[0, 1] = 8.0
    classes = torch.full((1, 3, NUM_CLASSES + 1), -6.0)
    classes[0, 0, 3] = 6.0
    classes[0, 2, 1] = 6.0
    classes[0, 1, NUM_CLASSES] = 6.0
    torch.manual_seed(0)
    [(pred, tgt)] = head.criterion.matcher(masks, classes, [torch.stack([left, right])], [torch.tensor([1, 3])])
    assert dict(zip(pred.tolist(), tgt.tolist())) == {2: 0, 0: 1}
    # swapping the targets' order swaps the assignment
    [(pred, tgt)] = head.criterion.matcher(masks, classes, [torch.stack([right, left])], [torch.tensor([3, 1])])
    assert dict(zip(pred.tolist(), tgt.tolist())) == {0: 0, 2: 1}


def test_semantic_inference_maps_one_confident_query_per_class_to_that_class():
    k, h, w = 4, 12, 20
    truth = torch.arange(h * w).reshape(h, w) % k  # every class present, stripes
    queries = 7
    g = torch.Generator().manual_seed(0)
    mask_cls = torch.randn(queries, k + 1, generator=g)
    mask_pred = torch.randn(queries, h, w, generator=g)
    order = [5, 2, 0, 3]  # class c is predicted by query order[c]
    for c, q in enumerate(order):
        mask_cls[q] = -10.0
        mask_cls[q, c] = 10.0
        mask_pred[q] = torch.where(truth == c, 10.0, -10.0)
    for q in set(range(queries)) - set(order):  # the rest say "no object"
        mask_cls[q] = -10.0
        mask_cls[q, k] = 10.0
    scores = semantic_inference(mask_cls, mask_pred)
    assert scores.shape == (k, h, w)
    assert torch.equal(scores.argmax(0), truth)
    # the scores are probabilities summed over queries: class softmax (no-object dropped) x mask sigmoid
    expected = torch.einsum("qk,qhw->khw", F.softmax(mask_cls, -1)[:, :k], torch.sigmoid(mask_pred))
    torch.testing.assert_close(scores, expected)


def test_inference_returns_class_scores_at_the_original_size():
    model = make_model().eval()
    inputs = [{"image": torch.rand(3, 70, 90) * 255},  # not a multiple of 32
              {"image": torch.rand(3, 70, 90) * 255, "height": 141, "width": 179}]  # resized by the mapper
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 70, 90)
    assert out[1]["sem_seg"].shape == (NUM_CLASSES, 141, 179)
    assert torch.isfinite(out[1]["sem_seg"]).all()
    assert (out[1]["sem_seg"] >= 0).all()


class _OracleHead(nn.Module):
    """Stands in for Mask2FormerHead at inference: one confident query per class whose
    mask logits are the ground truth (at the padded input size), optionally with every
    class label shifted by one."""

    def __init__(self, input_shape, num_classes, shift=0):
        super().__init__()
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.shift = shift
        self.labels = []  # (h, w) label maps of the next batch, at network input size

    def forward(self, features, targets=None):
        b = next(iter(features.values())).shape[0]
        hp, wp = next(iter(features.values())).shape[-2] * 4, next(iter(features.values())).shape[-1] * 4
        k = self.num_classes
        cls = torch.full((b, k, k + 1), -10.0)
        masks = torch.full((b, k, hp, wp), -10.0)
        for i, label in enumerate(self.labels):
            for c in range(k):
                cls[i, c, (c + self.shift) % k] = 10.0
                masks[i, c, : label.shape[0], : label.shape[1]][label == c] = 10.0
        return (cls, masks), {}


def _register(tmp_path, gt, name):
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    Image.fromarray(np.zeros((*gt.shape, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(gt, mode="L").save(tmp_path / "gt" / "a.png")
    DatasetCatalog.register(name, lambda: load_sem_seg(str(tmp_path / "gt"), str(tmp_path / "img"), "png", "jpg"))
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c", "d"], ignore_label=255, evaluator_type="sem_seg")
    return str(tmp_path / "img" / "a.jpg")


@pytest.mark.parametrize("upscale", [1, 2])
def test_evaluation_oracle_ground_truth_scores_100_and_shifted_classes_score_low(tmp_path, upscale):
    """Predictions made from the ground truth go through the model's own post-processing
    (semantic inference at the padded size, crop, resize to the original size) into
    detectron2's SemSegEvaluator: mIoU 100; the same with every class shifted by one: low.
    The network input is 37x53 (odd, padded to 64x64); with ``upscale`` 2 the original
    image is 74x106 and the scores are resized back to it."""
    k = 4
    small = np.zeros((37, 53), np.uint8)  # label map at the network's input size
    small[:, 20:] = 1
    small[25:, 30:] = 2
    small[5:15, 3:12] = 3
    small[:3] = 255  # ignored
    gt = np.kron(small, np.ones((upscale, upscale), np.uint8))  # the original-size ground truth
    file_name = _register(tmp_path, gt, f"test_m2f_oracle_{tmp_path.name}")
    results = {}
    for shift in (0, 1):
        torch.manual_seed(0)
        backbone = RevColV2Backbone("revcolv2_tiny", window_size=0, embed_dim=DIM, num_heads=2)
        head = _OracleHead(backbone.output_shape(), k, shift)
        model = RevColV2Mask2Former(backbone=backbone, sem_seg_head=head, pixel_mean=MEAN, pixel_std=STD).eval()
        head.labels = [torch.from_numpy(small.astype(np.int64))]
        inputs = [{"image": torch.zeros(3, 37, 53), "height": gt.shape[0], "width": gt.shape[1],
                   "file_name": file_name}]
        with torch.no_grad():
            out = model(inputs)
        assert out[0]["sem_seg"].shape == (k, *gt.shape)
        evaluator = SemSegEvaluator(f"test_m2f_oracle_{tmp_path.name}", distributed=False)
        evaluator.reset()
        evaluator.process(inputs, out)
        results[shift] = evaluator.evaluate()["sem_seg"]
    assert results[0]["mIoU"] == pytest.approx(100.0)
    assert results[0]["pACC"] == pytest.approx(100.0)
    assert results[1]["mIoU"] < 20.0


def test_head_width_that_does_not_match_the_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="revcolv2_level_shapes"):
        make_model(head_dim=64)
    with pytest.raises(ValueError, match="conv_dim must be a multiple of 32"):
        make_head(conv_dim=48)
    with pytest.raises(ValueError, match="mask_dim must be positive, got 0"):
        make_head(mask_dim=0)


def test_loss_normaliser_is_the_target_masks_averaged_over_processes(monkeypatch):
    """The criterion is a subclass of transformers' Mask2FormerLoss (no method patched onto
    an instance) whose normaliser averages the target-mask count over torch.distributed
    processes, here a simulated second process that holds 5 masks."""
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    from revcolv2_d2 import mask2former as m2f

    criterion = make_head().criterion
    assert isinstance(criterion, Mask2FormerLoss) and "get_num_masks" not in vars(criterion)
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    assert criterion.get_num_masks(labels, torch.device("cpu")).item() == 3.0
    assert criterion.get_num_masks([torch.tensor([], dtype=torch.long)], torch.device("cpu")).item() == 1.0

    monkeypatch.setattr(m2f.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(m2f.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(m2f.dist, "all_reduce", lambda t: t.add_(5.0))
    assert criterion.get_num_masks(labels, torch.device("cpu")).item() == 4.0  # (3 + 5) / 2


def test_full_model_clipping_bounds_the_global_gradient_norm():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    opt = FullModelGradClipAdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=1.0, clip_norm=0.01)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    opt.step()
    total = torch.cat([a.grad, b.grad]).norm()
    assert total == pytest.approx(0.01, rel=1e-4)  # clipped over both groups together
    ratio = a.grad[0] / b.grad[0]
    assert ratio == pytest.approx(3.0 / 4.0)  # one scale for the whole model


@pytest.mark.slow  # a subprocess / second process: end to end
def test_importing_the_project_does_not_need_transformers():
    code = ("import sys; import revcolv2_d2, revcolv2_d2.backbone, revcolv2_d2.upernet, revcolv2_d2.checkpoint, "
            "revcolv2_d2.data; assert 'transformers' not in sys.modules, 'transformers was imported'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "projects", "RevColV2")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
