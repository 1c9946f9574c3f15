"""What a resume continues from and what it follows: ``--resume auto`` (and detectron2's
``--resume``) take the checkpoint ``last_checkpoint`` names, not the highest step; a resumed
run follows the schedule of its config (epochs, warm-up, learning rates), refuses in one line
what it cannot follow (another batch, fewer epochs than done), and a checkpoint of another
model size is one line naming the file and the tensor."""
import pytest
import torch

from revcolv2.atomic_io import save_atomic
from revcolv2.run_checkpoints import find_resume_checkpoint, write_last_checkpoint


def _resume_point(path, step):
    save_atomic({"model": {}, "optimizer": {}, "step": step}, str(path))


# ----------------------------------------------------------------------------- which checkpoint
def test_resume_auto_follows_the_pointer_after_a_rollback(tmp_path, capsys):
    """A run rolled back to epoch 2 (``--resume checkpoint-0002.pth``) and stopped mid-epoch 3
    points at its checkpoint-last.pth; the abandoned branch's checkpoint-0004.pth has the
    higher step but is not what the run continues."""
    for epoch in (2, 3, 4):
        _resume_point(tmp_path / f"checkpoint-{epoch:04d}.pth", 4 * epoch)
    _resume_point(tmp_path / "checkpoint-last.pth", 10)  # the redone work: epoch 3, step 10
    write_last_checkpoint(str(tmp_path), "checkpoint-last.pth")
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    assert "not from" not in capsys.readouterr().out


def test_resume_auto_without_a_usable_pointer_takes_the_highest_step_and_says_so(tmp_path, capsys):
    for epoch in (1, 2):
        _resume_point(tmp_path / f"checkpoint-{epoch:04d}.pth", 4 * epoch)
    write_last_checkpoint(str(tmp_path), "checkpoint-last.pth")  # names a file that is not there
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-0002.pth")
    out = capsys.readouterr().out
    assert "checkpoint-last.pth, which does not exist" in out and "checkpoint-0002.pth" in out


def test_detectron2_resume_follows_the_pointer(tmp_path):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    ckpt = RevColV2Checkpointer(torch.nn.Linear(2, 2), str(tmp_path))
    for iteration in (2, 4):
        ckpt.save(f"model_{iteration:07d}", iteration=iteration)
    ckpt.tag_last_checkpoint("model_0000002.pth")  # rolled back to iteration 2
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000002.pth")
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 2
