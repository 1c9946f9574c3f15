"""tools/lazyconfig_train_net.py on the built-in data: train, checkpoint, resume, evaluate."""
import json
import os

import pytest
import torch
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES, TRAIN_NET, make_mini_shapes, run_tool

pytestmark = pytest.mark.slow  # the training tool in subprocesses


def _training_iterations(out):
    """Iterations logged with a training loss in metrics.json (evaluations log without)."""
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    return [r["iteration"] for r in records if "total_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training runs: 4 iterations with a checkpoint every 2, then --resume up to 6."""
    root = str(tmp_path_factory.mktemp("datasets"))
    make_mini_shapes(root)
    out = str(tmp_path_factory.mktemp("train"))
    common = ["--config-file", DEMO_CONFIG, *TINY_OVERRIDES, f"train.output_dir={out}",
              "train.checkpointer.period=2", "train.eval_period=0", "train.log_period=1"]
    first = run_tool([TRAIN_NET, *common, "train.max_iter=4"], root)
    first_iters = _training_iterations(out)
    resumed = run_tool([TRAIN_NET, "--resume", *common, "train.max_iter=6"], root)
    return dict(root=root, out=out, first=first, first_iters=first_iters, resumed=resumed)


def test_training_writes_checkpoints_and_evaluates(trained):
    out = trained["out"]
    assert os.path.isfile(os.path.join(out, "model_0000001.pth"))  # period 2: after iteration index 1
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert trained["first_iters"] == [0, 1, 2, 3]
    # the optimizer steps moved the weights between the two checkpoints
    early = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu", weights_only=False)["model"]
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]
    key = "roi_heads.box_predictor.cls_score.weight"
    assert not torch.equal(early[key], final[key])
    # the evaluation after the last iteration ran COCOEvaluator on the built-in val split
    with open(os.path.join(out, "last_eval.json")) as f:
        metrics = json.load(f)
    assert {"bbox", "segm"} <= set(metrics) and "AP50" in metrics["bbox"]
    # no temporary files left by the atomic saves
    assert not [n for n in os.listdir(out) if n.startswith(".tmp_")]


def test_resume_continues_the_iteration_count(trained):
    log = trained["resumed"].stdout + trained["resumed"].stderr
    assert "Starting training from iteration 4" in log
    assert _training_iterations(trained["out"]) == [0, 1, 2, 3, 4, 5]
    final = torch.load(os.path.join(trained["out"], "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 5


def test_eval_only_reports_coco_metrics(trained):
    out = trained["out"]
    proc = run_tool([TRAIN_NET, "--eval-only", "--config-file", DEMO_CONFIG, *TINY_OVERRIDES,
                     f"train.output_dir={out}",
                     f"train.init_checkpoint={os.path.join(out, 'model_final.pth')}"], trained["root"])
    log = proc.stdout + proc.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    with open(os.path.join(out, "last_eval.json")) as f:
        metrics = json.load(f)
    for task in ("bbox", "segm"):
        assert {"AP", "AP50", "AP75"} <= set(metrics[task])
