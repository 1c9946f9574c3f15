"""A symbolic link planted in a shared run folder does not make a run write into its target:
the lock and the files written in place (log.jsonl; detectron2's config.yaml, metrics.json,
text log) are opened without following links or refused while nothing is written yet, and
the files a run replaces (config.yaml, last_eval.json, the trimmed log, checkpoints, the
pointer) go through uniquely named temporary files renamed over the link, never through it."""
import os

import pytest
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.metrics_log import trim_log
from revcolv2.run_dir import RunFolderError, locked_run_dir

PRETRAIN = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 4 steps of 8 images per epoch


def pretrain(data, out, *opts, extra=()):
    return run_tool(
        "pretrain", "--config", PRETRAIN, "--data-path", data, "--output-dir", out, "--num-workers", "0",
        *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
        "train.batch_per_gpu=8", "train.vis_images=0", "schedule.warmup_epochs=0", "schedule.epochs=1", *opts,
    )


def plant(folder, name, victim, content=b"another user's file\n"):
    """``folder/name`` made a symbolic link to ``victim`` (which holds ``content`` unless it is
    meant not to exist: content None)."""
    folder.mkdir(parents=True, exist_ok=True)
    if content is not None:
        victim.write_bytes(content)
    os.symlink(victim, folder / name)
    return content


def test_the_lock_does_not_follow_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    content = plant(tmp_path / "out", ".run.lock", victim)
    with pytest.raises(RunFolderError) as e:
        with locked_run_dir(str(tmp_path / "out")):
            pytest.fail("the lock was taken through a link")
    assert ".run.lock" in str(e.value) and "symbolic link" in str(e.value) and "\n" not in str(e.value)
    assert victim.read_bytes() == content  # not emptied, no pid written into it


def test_the_lock_creates_nothing_at_a_dangling_links_target(tmp_path):
    victim = tmp_path / "elsewhere" / "created.txt"
    (tmp_path / "elsewhere").mkdir()
    plant(tmp_path / "out", ".run.lock", victim, content=None)
    with pytest.raises(RunFolderError, match="symbolic link"):
        with locked_run_dir(str(tmp_path / "out")):
            pass
    assert not victim.exists()


def test_a_refused_training_run_leaves_the_links_target_alone(data, tmp_path):
    victim = tmp_path / "victim.txt"
    content = plant(tmp_path / "out", ".run.lock", victim)
    with pytest.raises(RunFolderError, match=r"\.run\.lock"):
        pretrain(data, tmp_path / "out")
    assert victim.read_bytes() == content and not (tmp_path / "out" / "config.yaml").exists()


def test_log_jsonl_as_a_link_is_refused_before_anything_is_written(data, tmp_path):
    victim = tmp_path / "victim.jsonl"
    content = plant(tmp_path / "out", "log.jsonl", victim)
    with pytest.raises(RunFolderError, match="log.jsonl is a symbolic link"):
        pretrain(data, tmp_path / "out", extra=("--resume", "auto"))
    assert victim.read_bytes() == content and not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.slow  # trains one epoch
def test_config_yaml_as_a_link_is_replaced_not_written_through(data, tmp_path):
    victim = tmp_path / "victim.yaml"
    content = plant(tmp_path / "out", "config.yaml", victim)
    pretrain(data, tmp_path / "out")
    assert victim.read_bytes() == content
    config = tmp_path / "out" / "config.yaml"
    assert not config.is_symlink() and "schedule:" in config.read_text()


def test_trimming_the_log_never_writes_through_a_link(tmp_path):
    """The trimmed log goes to a temporary file of a unique name (not a fixed
    ``log.jsonl.tmp`` that a link could redirect), renamed over the log."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n')
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    os.symlink(victim, tmp_path / "log.jsonl.tmp")
    assert trim_log(str(log), 1, log=None) == 1
    assert log.read_text() == '{"step": 1}\n' and victim.read_text() == "mine\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


@pytest.mark.parametrize("name", ["config.yaml", "metrics.json", "log.txt"])
def test_train_net_refuses_a_link_among_the_files_it_writes_in_place(tmp_path, name):
    from revcolv2_d2.train_net import invoke_main

    victim = tmp_path / "victim"
    content = plant(tmp_path / "out", name, victim)
    with pytest.raises(RunFolderError) as e:
        invoke_main(["--config-file", DEMO_CONFIG, f"train.output_dir={tmp_path / 'out'}", *TINY_OVERRIDES])
    assert f"{name} is a symbolic link" in str(e.value) and "train.output_dir" in str(e.value)
    assert victim.read_bytes() == content


def test_eval_only_refuses_a_link_too(tmp_path):
    from revcolv2_d2.train_net import argument_parser, main

    victim = tmp_path / "victim"
    content = plant(tmp_path / "out", "config.yaml", victim)
    args = argument_parser().parse_args(["--config-file", DEMO_CONFIG, "--eval-only",
                                         f"train.output_dir={tmp_path / 'out'}", *TINY_OVERRIDES])
    with pytest.raises(RunFolderError, match="config.yaml is a symbolic link"):
        main(args)
    assert victim.read_bytes() == content


def test_last_eval_json_replaces_a_link(tmp_path):
    from revcolv2_d2.train_net import write_last_eval

    victim = tmp_path / "victim"
    content = plant(tmp_path / "out", "last_eval.json", victim)
    write_last_eval(str(tmp_path / "out"), {"bbox": {"AP": float("nan")}})
    assert victim.read_bytes() == content
    assert (tmp_path / "out" / "last_eval.json").read_text().startswith("{")
