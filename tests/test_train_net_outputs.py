"""What tools/lazyconfig_train_net.py writes and reads back: last_eval.json is strict JSON
(NaN -> null), a malformed metrics.json record does not stop --resume, and --eval-only of a
checkpoint trained with overrides says which config to use, in one line."""
import json
import logging

import pytest
import torch
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser
from omegaconf import OmegaConf


class _NanEvaluator:
    """COCO's AP is NaN for a category without ground truth; this evaluator says so at once."""

    def reset(self):
        pass

    def process(self, inputs, outputs):
        pass

    def evaluate(self):
        return {"bbox": {"AP": 12.5, "AP-circle": float("nan")}, "segm": {"AP": float("nan")}}


def test_last_eval_json_is_strict_json_and_reads_back(tmp_path):
    from revcolv2_d2.train_net import do_test

    cfg = OmegaConf.create({"dataloader": {"test": L(list)(), "evaluator": L(_NanEvaluator)()},
                            "train": {"output_dir": str(tmp_path)}}, flags={"allow_objects": True})
    do_test(cfg, torch.nn.Identity())
    text = (tmp_path / "last_eval.json").read_text()
    saved = json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} is not JSON:\n{text}"))
    assert saved == {"bbox": {"AP": 12.5, "AP-circle": None}, "segm": {"AP": None}}
    from revcolv2_d2.demo import _metric

    assert (_metric(saved["bbox"], "AP"), _metric(saved["segm"], "AP")) == ("12.5", "nan")  # the demo's summary


def test_a_malformed_metrics_record_is_skipped_with_a_warning(tmp_path, caplog):
    from revcolv2_d2.train_net import trim_metrics

    lines = [{"iteration": 0, "total_loss": 1.0}, {"iteration": "three"}, {"iteration": 1}, {"iteration": 2}]
    (tmp_path / "metrics.json").write_text("\n".join(map(json.dumps, lines)) + "\n{\"iter")
    with caplog.at_level(logging.WARNING, logger="detectron2"):
        assert trim_metrics(str(tmp_path), 2) == 1
    kept = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert kept == [lines[0], lines[2]]
    assert f"{tmp_path / 'metrics.json'}: skipped 2 malformed record(s)" in caplog.text
    assert "line(s) 2, 5" in caplog.text


def _args(*argv):
    args = default_argument_parser().parse_args(["--config-file", DEMO_CONFIG, *map(str, argv)])
    args.no_ema, args.overwrite = False, False
    return args


def test_eval_only_of_a_checkpoint_trained_with_overrides_points_at_its_saved_config(tmp_path):
    from revcolv2_d2.train_net import apply_overrides, main

    run = tmp_path / "run"
    run.mkdir()
    trained = apply_overrides(LazyConfig.load(DEMO_CONFIG), TINY_OVERRIDES)  # a 32-wide backbone
    torch.save({"model": instantiate(trained.model).state_dict(), "iteration": 9}, run / "model_final.pth")
    LazyConfig.save(trained, str(run / "config.yaml"))  # what default_setup saves beside a run
    with pytest.raises(SystemExit) as e:
        main(_args("--eval-only", f"train.init_checkpoint={run / 'model_final.pth'}",
                   f"train.output_dir={tmp_path / 'eval'}"))
    msg = str(e.value.code)
    assert "\n" not in msg and "different model size" in msg, msg
    assert f"--config-file {run / 'config.yaml'}" in msg, msg
    from revcolv2_d2.safe_config import load_lazy_config

    assert load_lazy_config(str(run / "config.yaml")).model.backbone.bottom_up.embed_dim == 32  # and it loads
