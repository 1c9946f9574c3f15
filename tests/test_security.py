"""Loading a file never runs code from it.

A pickle payload whose ``__reduce__`` calls ``os.system("touch MARKER")`` (or
``builtins.exec``) is placed where each entry point reads a checkpoint; every one must
refuse it with an error naming the file, and the marker file must not appear. The same for
a YAML config with a ``!!python/object/apply`` tag, and for a ``last_checkpoint`` pointer
that names a file outside its folder.
"""
import builtins
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from d2_helpers import DEMO_CONFIG
from PIL import Image
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

import revcolv2  # noqa: F401
from revcolv2.checkpoint import CheckpointError, load_checkpoint, load_file
from revcolv2.classification import evaluate_checkpoint, load_pretrained
from revcolv2.distributed import DistInfo
from revcolv2.run_checkpoints import find_resume_checkpoint, read_last_checkpoint

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)
D2_TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"]


class SystemPayload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def write_pth(path: Path, payload) -> Path:
    torch.save({"model": {"patch_embed.proj.weight": payload}, "epoch": 1, "step": 1}, path)
    return path


def write_pkl(path: Path, payload) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": payload}, "__author__": "someone"}, f)
    return path


@pytest.fixture(params=[SystemPayload, ExecPayload], ids=["os.system", "builtins.exec"])
def evil(request, tmp_path):
    marker = tmp_path / "MARKER"
    payload = request.param(marker)
    files = dict(pth=write_pth(tmp_path / "evil.pth", payload), pkl=write_pkl(tmp_path / "evil.pkl", payload))
    yield dict(marker=marker, **files)
    assert not marker.exists(), "the payload ran"


def _refused(excinfo, path):
    msg = str(excinfo.value)
    assert str(path) in msg and "refusing to load" in msg, msg


# ----------------------------------------------------------------------------- library calls
def test_load_file_refuses_both_formats(evil):
    for kind in ("pth", "pkl"):
        with pytest.raises(CheckpointError) as e:
            load_file(evil[kind])
        _refused(e, evil[kind])


def test_load_checkpoint_and_load_pretrained_refuse(evil):
    model = timm.create_model("revcolv2_tiny", num_classes=4, **TINY)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, str(evil["pth"]), verbose=False)
    _refused(e, evil["pth"])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, str(evil["pth"]), verbose=False)
    _refused(e, evil["pth"])


def test_evaluate_checkpoint_refuses(evil):
    model = timm.create_model("revcolv2_tiny", num_classes=4, **TINY)
    with pytest.raises(CheckpointError) as e:
        evaluate_checkpoint(model, str(evil["pth"]), [], DistInfo(), 2, 0, None)
    _refused(e, evil["pth"])


def test_detectron2_checkpointer_refuses_pth_and_pkl(evil):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    model = timm.create_model("revcolv2_tiny", num_classes=0, **TINY)
    for kind in ("pth", "pkl"):
        with pytest.raises(CheckpointError) as e:
            RevColV2Checkpointer(torch.nn.Sequential(model)).load(str(evil[kind]))
        _refused(e, evil[kind])


def test_pkl_of_numpy_arrays_still_loads(tmp_path):
    """What the restricted unpickler must keep reading: a detectron2 model-zoo pickle."""
    import numpy as np

    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int64(3)},
                     "__author__": "zoo"}, f)
    data = load_file(path)
    assert data["model"]["w"].shape == (2, 3) and int(data["model"]["n"]) == 3


# ----------------------------------------------------------------------------- the pointer
def test_last_checkpoint_may_only_name_a_file_in_its_folder(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere.pth"
    run.mkdir()
    torch.save({"model": {}, "optimizer": {}, "step": 1}, outside)
    for name in (str(outside), "../elsewhere.pth", "sub/../../elsewhere.pth"):
        (run / "last_checkpoint").write_text(name)
        with pytest.raises(CheckpointError, match="not a file inside"):
            read_last_checkpoint(str(run))
        with pytest.raises(CheckpointError, match="not a file inside"):
            find_resume_checkpoint("auto", str(run))
    (run / "last_checkpoint").write_text("checkpoint-0001.pth")
    assert read_last_checkpoint(str(run)) == os.path.join(str(run), "checkpoint-0001.pth")


def test_detectron2_resume_refuses_a_pointer_out_of_its_folder(evil, tmp_path):
    """lazyconfig_train_net.py --resume: detectron2 would load whatever last_checkpoint names."""
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    run = tmp_path / "run"
    run.mkdir()
    (run / "last_checkpoint").write_text(str(evil["pth"]))
    with pytest.raises(CheckpointError, match="not a file inside"):
        RevColV2Checkpointer(torch.nn.Linear(2, 2), str(run)).resume_or_load("", resume=True)


# ----------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"), classes=2, train_per_class=2, val_per_class=1)


def _classification(tool: str, data: Path, out: Path, *args) -> list:
    config = REPO / "configs" / tool / "revcolv2_tiny_demo.yaml"
    return [tool, "--config", config, "--data-path", data, "--output-dir", out, "--num-workers", "0",
            "--device", "cpu", *args, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}",
            "optim.batch_size=2", "train.batch_per_gpu=2"]


def test_training_tools_refuse_the_payload(data, evil, tmp_path):
    """finetune --finetune / --resume, linear_probe --finetune, pretrain --resume PATH and
    --resume auto with an absolute path in last_checkpoint (their main(), in this process)."""
    pointed = tmp_path / "pointed"
    pointed.mkdir()
    (pointed / "last_checkpoint").write_text(str(evil["pth"]))  # an absolute path out of the folder
    cases = [
        (_classification("finetune", data, tmp_path / "f1", "--finetune", evil["pth"]), evil["pth"]),
        (_classification("finetune", data, tmp_path / "f2", "--resume", evil["pth"]), evil["pth"]),
        (_classification("linear_probe", data, tmp_path / "l1", "--finetune", evil["pth"]), evil["pth"]),
        (_classification("pretrain", data, tmp_path / "p1", "--resume", evil["pth"]), evil["pth"]),
        (_classification("pretrain", data, pointed, "--resume", "auto"), pointed / "last_checkpoint"),
    ]
    for argv, named in cases:
        with pytest.raises(CheckpointError) as e:
            run_tool(*argv)
        _refused(e, named)


def test_visualize_refuses_the_payload(evil, tmp_path):
    from revcolv2_d2 import visualization as visualize

    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    for kind in ("pkl", "pth"):
        with pytest.raises(CheckpointError) as e:
            visualize.main(["--config-file", DEMO_CONFIG, "--checkpoint", str(evil[kind]), "--input", str(image),
                            "--output", str(tmp_path / "vis"), "--opts", *D2_TINY])
        _refused(e, evil[kind])


@pytest.mark.slow  # a subprocess / second process: end to end
def test_lazyconfig_train_net_refuses_pkl_and_yaml(tmp_path):
    """Two subprocesses, started together: init_checkpoint=*.pkl, and --config-file evil.yaml."""
    marker = tmp_path / "MARKER"
    evil_pkl = write_pkl(tmp_path / "evil.pkl", SystemPayload(marker))
    evil_yaml = tmp_path / "evil.yaml"
    evil_yaml.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    commands = {
        evil_pkl: ["--eval-only", "--config-file", DEMO_CONFIG, *D2_TINY, f"train.init_checkpoint={evil_pkl}",
                   f"train.output_dir={tmp_path / 'out'}"],
        evil_yaml: ["--config-file", evil_yaml],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", DETECTRON2_DATASETS=str(tmp_path))
    procs = {path: subprocess.Popen([sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"), *map(str, args)],
                                    cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for path, args in commands.items()}
    for path, p in procs.items():
        log = p.communicate(timeout=300)[0]
        last = log.strip().splitlines()[-1]
        assert p.returncode != 0 and str(path) in last and "refusing to load" in last, log[-3000:]
    assert not marker.exists(), "the payload ran"


# ----------------------------------------------------------------------------- export
def _tools_export():
    """tools/export.py as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_export", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_refuses_the_payload(evil, tmp_path):
    """Exporting a downloaded checkpoint is what users do: the library call and tools/export.py."""
    from revcolv2.export import export_to_folder

    with pytest.raises(CheckpointError) as e:
        export_to_folder(str(evil["pth"]), str(tmp_path / "lib"), "revcolv2_tiny", TINY, verbose=False)
    _refused(e, evil["pth"])
    with pytest.raises(CheckpointError) as e:
        _tools_export().main([str(evil["pth"]), "--output", str(tmp_path / "cli"), "--model", "revcolv2_tiny"])
    _refused(e, evil["pth"])
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()


# ----------------------------------------------------------------------------- the code itself
CODE_ROOTS = ("revcolv2", "projects/RevColV2/revcolv2_d2", "tools")
SAFE_LOADER = "revcolv2/checkpoint.py"  # the one place that calls torch.load (weights_only=True)


def unsafe_loads(path: Path, rel: str) -> list:
    """(line, what) for each call in ``path`` that could build arbitrary objects from a file:
    ``weights_only=False``, ``torch.load`` outside the safe loader, ``pickle.load(s)`` /
    ``pickle.Unpickler``, a YAML loader that is not a ``SafeLoader``, numpy's ``allow_pickle=True``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "cloudpickle", "dill", "marshal"):
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if "load" in a.name]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        for kw in node.keywords:
            if (kw.arg, getattr(kw.value, "value", None)) in (("weights_only", False), ("allow_pickle", True)):
                found.append((node.lineno, f"{name}({kw.arg}={kw.value.value})"))
        if name == "torch.load" and rel != SAFE_LOADER:
            found.append((node.lineno, "torch.load outside the safe loader revcolv2.checkpoint.load_file"))
        if name.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal") and name.endswith(
                ("load", "loads", "Unpickler")):
            found.append((node.lineno, name))
        if name in ("yaml.load", "yaml.load_all"):  # safe only with a SafeLoader (or a subclass of it)
            loader = next((ast.unparse(kw.value) for kw in node.keywords if kw.arg == "Loader"), None)
            if loader is None or loader.split(".")[-1] in ("Loader", "UnsafeLoader", "FullLoader", "CLoader",
                                                           "CUnsafeLoader", "CFullLoader"):
                found.append((node.lineno, f"{name}(Loader={loader})"))
        elif name in ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            found.append((node.lineno, name))
    return found


def test_no_code_loads_a_file_unsafely():
    files = sorted(p for root in CODE_ROOTS for p in (REPO / root).rglob("*.py"))
    assert len(files) > 30
    bad = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files
           for line, what in unsafe_loads(p, str(p.relative_to(REPO)))]
    assert not bad, "unsafe loads (use revcolv2.checkpoint.load_file or yaml.safe_load):\n" + "\n".join(bad)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    code = tmp_path / "x.py"
    code.write_text("import pickle, torch, yaml\n"
                    "a = torch.load(p, weights_only=False)\n"
                    "b = pickle.load(f)\n"
                    "c = yaml.load(s, Loader=yaml.Loader)\n"
                    "d = yaml.safe_load(s)  # fine\n"
                    "f = yaml.load(s, Loader=ConfigSafeLoader)  # a SafeLoader subclass: fine\n"
                    "g = yaml.unsafe_load(s)\n"
                    "e = 'torch.load(x, weights_only=False)'  # a string: fine\n")
    assert [line for line, _ in unsafe_loads(code, "x.py")] == [2, 2, 3, 4, 7]
