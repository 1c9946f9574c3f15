"""One location rule for every built-in dataset (synthetic_imagenet, synthetic_shapes,
synthetic_ade): ``$DETECTRON2_DATASETS`` when set, else ``datasets`` in the working
directory, never the checkout, so a read-only checkout works from any writable folder."""
import os
import shutil
import stat
import subprocess
import sys

import pytest
from training_helpers import REPO

import revcolv2.data
from revcolv2 import synthetic_imagenet
from revcolv2.data import datasets_root, resolve_data_path


@pytest.fixture
def small_generation(monkeypatch):
    """The built-in ImageNet-style dataset generated at test size (the real one has 3100 images)."""
    real = synthetic_imagenet.generate_synthetic_imagenet
    monkeypatch.setattr(synthetic_imagenet, "generate_synthetic_imagenet",
                        lambda root, **kw: real(root, num_classes=2, train_per_class=1, val_per_class=1, size=16))


def test_without_the_variable_the_datasets_go_to_the_working_directory(tmp_path, monkeypatch, small_generation):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert datasets_root() == "datasets"
    path = resolve_data_path(None)
    assert path.resolve() == tmp_path / "datasets" / "synthetic_imagenet"
    assert sorted(p.name for p in path.iterdir()) == ["train", "val"]


def test_the_variable_names_the_folder(tmp_path, monkeypatch, small_generation):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "shared" / "data"))
    monkeypatch.chdir(tmp_path)
    path = resolve_data_path(None)
    assert path == tmp_path / "shared" / "data" / "synthetic_imagenet" and (path / "train").is_dir()
    assert sorted(os.listdir(tmp_path)) == ["shared"]  # nothing in the working directory


def test_the_detectron2_datasets_follow_the_same_rule():
    import revcolv2_d2.data  # register_all and tools/demo.py take their root from here

    assert revcolv2_d2.data.datasets_root is revcolv2.data.datasets_root


def test_an_unwritable_location_says_which_variable_to_set(tmp_path, monkeypatch):
    """Each built-in dataset fails the same clear way when its folder cannot be created (a
    path below a regular file stands in for a read-only place: the tests may run as root)."""
    from revcolv2_d2.data.synthetic_ade20k import ensure_synthetic_ade
    from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes

    blocked = tmp_path / "a_file"
    blocked.write_text("")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(blocked / "datasets"))
    for make in (lambda: resolve_data_path(None), lambda: ensure_synthetic_shapes(datasets_root()),
                 lambda: ensure_synthetic_ade(datasets_root())):
        with pytest.raises(OSError, match=r"a_file/datasets for the built-in datasets .*set DETECTRON2_DATASETS"):
            make()


@pytest.mark.slow  # a subprocess
def test_a_read_only_checkout_generates_in_the_working_directory(tmp_path):
    """The package copied into a read-only folder and run from another one: the dataset lands
    in the working directory and the checkout is left as it was."""
    checkout, work = tmp_path / "checkout", tmp_path / "work"
    shutil.copytree(REPO / "revcolv2", checkout / "revcolv2", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    for folder, _, files in os.walk(checkout):
        for name in files:
            os.chmod(os.path.join(folder, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    before = sorted(os.path.relpath(os.path.join(d, n), checkout) for d, ds, fs in os.walk(checkout) for n in ds + fs)
    code = ("import revcolv2.synthetic_imagenet as s; real = s.generate_synthetic_imagenet; "
            "s.generate_synthetic_imagenet = lambda root, **kw: real(root, num_classes=2, train_per_class=1, "
            "val_per_class=1, size=16); "
            "from revcolv2.data import resolve_data_path; print(resolve_data_path(None).resolve())")
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    env.update(PYTHONPATH=str(checkout), PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == str(work / "datasets" / "synthetic_imagenet")
        after = sorted(os.path.relpath(os.path.join(d, n), checkout) for d, ds, fs in os.walk(checkout)
                       for n in ds + fs)
        assert after == before
    finally:
        for folder, _, _ in os.walk(checkout):
            os.chmod(folder, stat.S_IRWXU)
