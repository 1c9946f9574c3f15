"""UperNet head + RevColV2SemanticSegmentor: training/inference contract, ignore label,
sliding-window inference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from revcolv2_d2.backbone import RevColV2Backbone
from revcolv2_d2.upernet import RevColV2SemanticSegmentor, UPerHead, revcolv2_level_shapes

NUM_CLASSES = 5
DIM = 32
SHAPES = revcolv2_level_shapes("revcolv2_tiny", embed_dim=DIM, num_heads=2)  # the backbone's level shapes


def make_model(test_mode="slide", crop=64, stride=43, dim=DIM, head_dim=DIM):
    torch.manual_seed(0)
    backbone = RevColV2Backbone("revcolv2_tiny", window_size=0, embed_dim=dim, num_heads=2)
    head = UPerHead(revcolv2_level_shapes("revcolv2_tiny", embed_dim=head_dim,
                                          num_heads=2), num_classes=NUM_CLASSES, channels=16, aux_channels=8, norm="BN")
    return RevColV2SemanticSegmentor(
        backbone=backbone, sem_seg_head=head, pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375], test_mode=test_mode, crop_size=(crop, crop), stride=(stride, stride),
    )


def batch(n=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        label = torch.randint(0, NUM_CLASSES, (h, w), generator=g)
        label[: h // 4] = 255  # an ignored band
        out.append({"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "sem_seg": label})
    return out


@pytest.mark.slow
def test_training_returns_losses_and_gradients_reach_every_parameter():
    model = make_model().train()
    losses = model(batch())
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_aux_loss_weight_and_aux_head_optional():
    head = UPerHead(SHAPES, num_classes=NUM_CLASSES, channels=16, norm="BN", aux_in_feature=None)
    feats = {k: torch.randn(2, s.channels, 64 // s.stride, 64 // s.stride) for k, s in SHAPES.items()}
    _, losses = head.train()(feats, torch.randint(0, NUM_CLASSES, (2, 64, 64)))
    assert set(losses) == {"loss_sem_seg"}
    assert UPerHead(SHAPES, num_classes=3, norm="BN").aux_loss_weight == 0.4


@pytest.mark.parametrize("test_mode", ["slide", "whole"])
def test_inference_returns_class_logits_at_input_resolution(test_mode):
    model = make_model(test_mode).eval()
    inputs = [{"image": torch.rand(3, 70, 90) * 255},  # not a multiple of 32
              {"image": torch.rand(3, 70, 90) * 255, "height": 140, "width": 180}]  # resized by the mapper
    with torch.no_grad():
        out = model(inputs)
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 70, 90)
    assert out[1]["sem_seg"].shape == (NUM_CLASSES, 140, 180)
    assert torch.isfinite(out[1]["sem_seg"]).all()


def test_ignored_pixels_take_no_part_in_the_loss():
    head = UPerHead(SHAPES, num_classes=NUM_CLASSES, channels=16, norm="BN").train()
    logits = torch.randn(2, NUM_CLASSES, 64, 64)  # at label resolution: no resampling
    target = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    target[:, :20] = 255
    loss = head.losses(logits, target)["loss_sem_seg"]
    # the mean negative log-likelihood over the labelled pixels only
    keep = target != 255
    nll = -F.log_softmax(logits, dim=1).permute(0, 2, 3, 1)[keep].gather(1, target[keep][:, None])
    torch.testing.assert_close(loss, nll.mean())
    # whatever the model predicts at ignored pixels, the loss does not change
    changed = logits.clone()
    changed[:, :, :20] = torch.randn(2, NUM_CLASSES, 20, 64) * 10
    torch.testing.assert_close(head.losses(changed, target)["loss_sem_seg"], loss)


def test_ignored_pixels_take_no_part_in_the_metrics(tmp_path):
    """A prediction right on every labelled pixel scores 100 mIoU whatever it says at 255."""
    (tmp_path / "img").mkdir()
    (tmp_path / "gt").mkdir()
    gt = np.zeros((20, 30), np.uint8)
    gt[:, 10:20] = 1
    gt[:, 20:] = 2
    gt[:5] = 255
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(gt, mode="L").save(tmp_path / "gt" / "a.png")
    name = f"test_ignore_metric_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: load_sem_seg(str(tmp_path / "gt"), str(tmp_path / "img"), "png", "jpg"))
    MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255, evaluator_type="sem_seg")
    pred = torch.from_numpy(np.where(gt == 255, 0, gt)).long()
    pred[:5] = 2  # wrong on ignored pixels, were they counted
    logits = F.one_hot(pred, 3).permute(2, 0, 1).float()
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    evaluator.process([{"file_name": str(tmp_path / "img" / "a.jpg")}], [{"sem_seg": logits}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0)
    assert res["pACC"] == pytest.approx(100.0)
    assert res["fwIoU"] == pytest.approx(100.0)


def test_slide_equals_whole_when_the_image_is_one_crop():
    slide, whole = make_model("slide", crop=64).eval(), make_model("whole", crop=64).eval()
    whole.load_state_dict(slide.state_dict())
    inputs = [{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}]
    assert RevColV2SemanticSegmentor.window_boxes(64, 64, (64, 64), (43, 43)) == [(0, 64, 0, 64)]
    with torch.no_grad():
        a, b = slide(inputs)[0]["sem_seg"], whole(inputs)[0]["sem_seg"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sliding_windows_cover_the_image_inside_its_borders():
    for h, w in [(100, 150), (64, 200), (30, 40)]:
        boxes = RevColV2SemanticSegmentor.window_boxes(h, w, (64, 64), (43, 43))
        cover = np.zeros((h, w), int)
        for y0, y1, x0, x1 in boxes:
            assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
            assert (y1 - y0, x1 - x0) == (min(64, h), min(64, w))
            cover[y0:y1, x0:x1] += 1
        assert cover.min() >= 1
    assert len(RevColV2SemanticSegmentor.window_boxes(30, 40, (64, 64), (43, 43))) == 1


def test_head_width_that_does_not_match_the_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="revcolv2_level_shapes"):
        make_model(dim=32, head_dim=64)
