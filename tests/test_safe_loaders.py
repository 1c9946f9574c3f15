"""Every safe loader, under every name and extension it accepts, and with files written by
other library versions.

For each loader and each file name it reads (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, no
extension, ``.pth.tar``, upper case, ``.pkl``, ``.pyth``, ``.yaml`` / ``.yml``, a timm
``local-dir:`` folder), (a) a good file loads with its values, and (b) a malicious pickle
(a ``__reduce__`` that would run a command writing a marker file) is refused with an error
naming the file, and the marker does not appear. A file of one format under the other
format's name (a plain pickle renamed ``.pth``, a ``torch.save`` file named ``.pkl``) is
refused too. ``tests/fixtures/numpy_versions`` holds small files written under numpy 1.x
and numpy 2.x (``torch.save`` and ``pickle`` protocols 2, 4, 5; how they were made:
its README): each loads with the project's loaders, with its values and RNG state.
"""
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from d2_helpers import DEMO_CONFIG
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

import revcolv2  # noqa: F401  (registers the presets with timm)
from revcolv2.checkpoint import CheckpointError, load_file

FIXTURES = Path(__file__).parent / "fixtures" / "numpy_versions"
NUMPY_FILES = [f"numpy{major}{kind}" for major in (1, 2)
               for kind in (".pth", "_protocol2.pkl", "_protocol4.pkl", "_protocol5.pkl")]
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)
D2_TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"]

# names that go through torch.load(weights_only=True): every name but *.pkl
TORCH_NAMES = ["ckpt.pth", "ckpt.pt", "ckpt.bin", "ckpt.ckpt", "ckpt", "ckpt.pth.tar", "CKPT.PTH", "ckpt.pyth"]
PICKLE_NAMES = ["ckpt.pkl"]


class RunsCommand:
    """A pickle payload: unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the payload ran"


def evil_torch(path: Path, marker: Path, legacy: bool = False) -> Path:
    torch.save({"model": {"weight": RunsCommand(marker)}, "model_state": {}}, path,
               _use_new_zipfile_serialization=not legacy)
    return path


def evil_pickle(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"weight": RunsCommand(marker)}, "__author__": "x"}, f)
    return path


def refused(excinfo, path: Path) -> None:
    msg = str(excinfo.value)
    assert str(path) in msg, msg


def linear_weights():
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([0.5, -0.5])}


# ----------------------------------------------------------------------------- load_file, by name
@pytest.mark.parametrize("name", TORCH_NAMES)
def test_load_file_reads_a_torch_file_under_each_name(tmp_path, name):
    path = tmp_path / name
    torch.save({"model": linear_weights(), "step": 3, "array": np.arange(3)}, path)
    data = load_file(path)
    assert torch.equal(data["model"]["weight"], linear_weights()["weight"]) and data["step"] == 3
    assert data["array"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_load_file_reads_the_legacy_torch_format_under_each_name(tmp_path, name):
    """``torch.save`` before PyTorch 1.6 (``_use_new_zipfile_serialization=False``)."""
    path = tmp_path / name
    torch.save({"model": linear_weights()}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(path)["model"]["bias"], linear_weights()["bias"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", TORCH_NAMES)
def test_load_file_refuses_a_payload_under_each_torch_name(tmp_path, marker, name, legacy):
    path = evil_torch(tmp_path / name, marker, legacy)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        load_file(path)
    refused(e, path)


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_load_file_refuses_a_plain_pickle_renamed_to_a_torch_name(tmp_path, marker, name):
    path = evil_pickle(tmp_path / name, marker)
    with pytest.raises(CheckpointError) as e:
        load_file(path)
    refused(e, path)


@pytest.mark.parametrize("name", PICKLE_NAMES)
def test_load_file_reads_and_refuses_pickles(tmp_path, marker, name):
    good = tmp_path / name
    with open(good, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in linear_weights().items()}, "__author__": "zoo"}, f)
    assert load_file(good)["model"]["weight"].tolist() == linear_weights()["weight"].tolist()
    bad = evil_pickle(tmp_path / ("evil_" + name), marker)
    with pytest.raises(CheckpointError, match="refusing to load") as e:
        load_file(bad)
    refused(e, bad)
    torch_named_pkl = evil_torch(tmp_path / ("torch_" + name), marker)  # a torch.save file named .pkl
    with pytest.raises(CheckpointError) as e:
        load_file(torch_named_pkl)
    refused(e, torch_named_pkl)


def test_upper_case_pkl_is_read_as_a_torch_file_and_a_payload_in_it_is_refused(tmp_path, marker):
    """``.PKL`` is not the restricted unpickler's extension: it goes through torch.load, which
    refuses the payload and does not mistake a plain pickle for a checkpoint."""
    bad = evil_pickle(tmp_path / "EVIL.PKL", marker)
    with pytest.raises(CheckpointError) as e:
        load_file(bad)
    refused(e, bad)
    good = tmp_path / "GOOD.PKL"
    with open(good, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}}, f)
    with pytest.raises(CheckpointError) as e:
        load_file(good)
    refused(e, good)


# ----------------------------------------------------------------------------- numpy 1.x and 2.x files
@pytest.fixture
def saved_numpy_rng():
    state = np.random.get_state()
    yield
    np.random.set_state(state)


@pytest.mark.parametrize("name", NUMPY_FILES)
def test_files_written_under_numpy_1_and_2_load_with_their_values(name, saved_numpy_rng):
    data = load_file(FIXTURES / name)
    assert data["numpy_version"].split(".")[0] == name[5]  # written by the numpy the name says
    arrays, scalars = data["arrays"], data["scalars"]
    assert {k: str(v.dtype) for k, v in arrays.items()} == {
        "float16": "float16", "float64": "float64", "int16": "int16", "int64": "int64", "uint8": "uint8",
        "uint64": "uint64", "bool": "bool", "fortran": "int32"}
    assert arrays["uint64"].tolist() == [2 ** 63] and arrays["int16"].tolist() == [[-3, 4]]
    assert arrays["float16"].tolist() == [1.5, -2.0] and arrays["float64"].tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    assert arrays["fortran"].tolist() == [[0, 1, 2], [3, 4, 5]] and arrays["fortran"].flags["F_CONTIGUOUS"]
    assert {k: (type(v).__name__, v.item()) for k, v in scalars.items()} == {
        "int64": ("int64", 7), "int32": ("int32", -7), "float32": ("float32", 0.25), "float64": ("float64", 1.5),
        "bool": ("bool_", True), "uint8": ("uint8", 200)}
    np.random.set_state(data["numpy_rng"])  # the RNG state restores: the same draws follow
    assert [float(x) for x in np.random.rand(3)] + [float(np.random.randn())] == data["numpy_rng_next"]
    if name.endswith(".pth"):  # a training checkpoint's rng entry
        rng = data["rng"][0]
        assert rng["numpy"][0] == "MT19937" and np.array_equal(rng["numpy"][1], data["numpy_rng"][1])
        assert isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8
        random.setstate(rng["python"])  # a valid Python RNG state


@pytest.mark.parametrize("name", NUMPY_FILES)
def test_files_written_under_numpy_1_and_2_load_through_the_detectron2_checkpointer(name):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    model = torch.nn.Linear(3, 2)
    extra = RevColV2Checkpointer(model).load(str(FIXTURES / name))
    assert torch.equal(model.weight.detach(), torch.arange(6.0).reshape(2, 3) / 8)
    assert torch.equal(model.bias.detach(), torch.tensor([0.5, -0.25]))
    assert extra["numpy_rng_next"] and extra["__author__"].startswith("tests/fixtures/numpy_versions")


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_a_numpy_2_torch_file_loads_under_each_name(tmp_path, name):
    shutil.copy(FIXTURES / "numpy2.pth", tmp_path / name)
    assert load_file(tmp_path / name)["model"]["bias"].tolist() == [0.5, -0.25]


# ----------------------------------------------------------------------------- detectron2 checkpointer
def _d2_files(folder: Path):
    """name -> a good file in each format the detectron2 checkpointer reads (the weights of
    a Linear(3, 2))."""
    w = linear_weights()
    npw = {k: v.numpy() for k, v in w.items()}
    files = {}
    for name in ("ckpt.pth", "ckpt.pt", "ckpt.bin", "ckpt.ckpt", "ckpt", "CKPT.PTH"):
        torch.save({"model": w, "iteration": 7}, folder / name)  # what detectron2 writes
        files[name] = folder / name
    torch.save(w, folder / "raw.pth")  # a bare state dict
    files["raw.pth"] = folder / "raw.pth"
    with open(folder / "zoo.pkl", "wb") as f:  # detectron2 model-zoo format
        pickle.dump({"model": npw, "__author__": "Detectron2 Model Zoo"}, f)
    files["zoo.pkl"] = folder / "zoo.pkl"
    with open(folder / "caffe2.pkl", "wb") as f:  # Caffe2 blobs, momentum buffers dropped
        pickle.dump({"blobs": {**npw, "weight_momentum": np.zeros((2, 3), np.float32)}}, f)
    files["caffe2.pkl"] = folder / "caffe2.pkl"
    torch.save({"model_state": w, "epoch": 3}, folder / "pycls.pyth")  # pycls
    files["pycls.pyth"] = folder / "pycls.pyth"
    return files


def test_detectron2_checkpointer_reads_each_format_and_name(tmp_path):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    for name, path in _d2_files(tmp_path).items():
        model = torch.nn.Linear(3, 2)
        torch.nn.init.zeros_(model.weight)
        RevColV2Checkpointer(model).load(str(path))
        assert torch.equal(model.weight.detach(), linear_weights()["weight"]), name
        assert torch.equal(model.bias.detach(), linear_weights()["bias"]), name


@pytest.mark.parametrize("name", ["evil.pth", "evil.pt", "evil.bin", "evil.ckpt", "evil", "EVIL.PTH", "evil.pyth",
                                  "evil.pkl", "EVIL.PKL", "EVIL.PYTH"])
def test_detectron2_checkpointer_refuses_a_payload_under_each_name(tmp_path, marker, name):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    path = tmp_path / name
    if name.lower().endswith(".pkl"):
        evil_pickle(path, marker)
    else:
        evil_torch(path, marker)
    with pytest.raises(CheckpointError) as e:
        RevColV2Checkpointer(torch.nn.Linear(3, 2)).load(str(path))
    refused(e, path)


# ----------------------------------------------------------------------------- YAML LazyConfigs
GOOD_YAML = "model:\n  _target_: torch.nn.Linear\n  in_features: 3\n  out_features: 2\n"


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_configs_load_under_both_extensions_and_refuse_a_python_tag(tmp_path, marker, suffix):
    from detectron2.config import instantiate

    from revcolv2_d2.safe_config import UnsafeConfigError, load_lazy_config

    good = tmp_path / f"good{suffix}"
    good.write_text(GOOD_YAML)
    model = instantiate(load_lazy_config(str(good)).model)
    assert isinstance(model, torch.nn.Linear) and model.out_features == 2
    bad = tmp_path / f"evil{suffix}"
    bad.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UnsafeConfigError, match="refusing to load") as e:
        load_lazy_config(str(bad))
    refused(e, bad)


@pytest.mark.parametrize("name", ["evil.YAML", "evil.YML", "evil.cfg", "evil"])
def test_a_yaml_config_under_another_extension_is_not_read(tmp_path, marker, name):
    """detectron2 reads only .py / .yaml / .yml: any other name is an error, never yaml.unsafe_load."""
    from revcolv2_d2.safe_config import load_lazy_config

    bad = tmp_path / name
    bad.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError) as e:
        load_lazy_config(str(bad))
    refused(e, bad)


# ----------------------------------------------------------------------------- timm local-dir / file
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from revcolv2.export import export_to_folder

    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=3, **TINY)
    folder = tmp_path_factory.mktemp("export")
    torch.save({"model": model.state_dict()}, folder / "ckpt.pth")
    export_to_folder(str(folder / "ckpt.pth"), str(folder / "timm"), "revcolv2_tiny", TINY, verbose=False)
    return folder / "timm", model.state_dict()


def test_timm_local_dir_export_loads(exported):
    folder, sd = exported
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert torch.equal(model.state_dict()["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    overlay = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=3, **TINY,
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=3))
    assert torch.equal(overlay.state_dict()["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pth", "weights.pth.tar"])
def test_timm_local_dir_refuses_a_pickle_payload(exported, tmp_path, marker, name):
    """A folder whose weights are a pickle instead of safetensors: timm reads it with
    weights_only=True, so the payload does not run."""
    folder = tmp_path / "dir"
    folder.mkdir()
    shutil.copy(exported[0] / "config.json", folder / "config.json")
    evil_torch(folder / name, marker)
    with pytest.raises(RuntimeError, match="weights_only=True blocked .* posix.system"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    with pytest.raises(RuntimeError, match="weights_only=True blocked .* posix.system"):
        timm.create_model("revcolv2_tiny", pretrained=True, **TINY,
                          pretrained_cfg_overlay=dict(file=str(folder / name)))


# ----------------------------------------------------------------------------- the tools' inputs
def _tools_export():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tools_export", REPO / "tools" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.ckpt", "evil", "evil.pkl", "EVIL.PKL"])
def test_export_tool_refuses_a_payload_under_each_name(tmp_path, marker, name):
    path = tmp_path / name
    evil_pickle(path, marker) if name.lower().endswith(".pkl") else evil_torch(path, marker)
    with pytest.raises(CheckpointError) as e:
        _tools_export().main([str(path), "--output", str(tmp_path / "out"), "--model", "revcolv2_tiny"])
    refused(e, path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["evil.pyth", "evil"])
def test_visualize_refuses_a_payload_under_other_names(tmp_path, marker, name):
    from PIL import Image

    from revcolv2_d2 import visualization as visualize

    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32)).save(image)
    path = evil_torch(tmp_path / name, marker)
    with pytest.raises(CheckpointError) as e:
        visualize.main(["--config-file", DEMO_CONFIG, "--checkpoint", str(path), "--input", str(image),
                        "--output", str(tmp_path / "vis"), "--opts", *D2_TINY])
    refused(e, path)


def test_training_tools_refuse_a_payload_under_other_names(tmp_path, marker):
    """--finetune of fine-tuning and linear probing, --resume of pre-training."""
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    cases = [("finetune", "--finetune", evil_pickle(tmp_path / "evil.pkl", marker)),
             ("linear_probe", "--finetune", evil_torch(tmp_path / "evil", marker)),
             ("pretrain", "--resume", evil_torch(tmp_path / "evil.ckpt", marker))]
    for tool, option, path in cases:
        config = REPO / "configs" / tool / "revcolv2_tiny_demo.yaml"
        with pytest.raises(CheckpointError) as e:
            run_tool(tool, "--config", config, "--data-path", data, "--output-dir", tmp_path / tool,
                     "--num-workers", "0", "--device", "cpu", option, path, "--opts", "data.input_size=32",
                     f"model.kwargs={TINY_MODEL}", "optim.batch_size=2", "train.batch_per_gpu=2")
        refused(e, path)


@pytest.mark.slow  # subprocesses
def test_lazyconfig_train_net_eval_only_refuses_a_payload_under_other_names(tmp_path):
    marker = tmp_path / "MARKER"
    paths = [evil_torch(tmp_path / "evil.pyth", marker), evil_torch(tmp_path / "evil", marker),
             evil_torch(tmp_path / "evil.bin", marker)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", DETECTRON2_DATASETS=str(tmp_path))
    procs = {path: subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"), "--eval-only", "--config-file", DEMO_CONFIG,
         *D2_TINY, f"train.init_checkpoint={path}", f"train.output_dir={tmp_path / path.name}_out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for path in paths}
    for path, p in procs.items():
        log = p.communicate(timeout=300)[0]
        last = log.strip().splitlines()[-1]
        assert p.returncode != 0 and str(path) in last and "refusing to load" in last, log[-3000:]
    assert not marker.exists(), "the payload ran"
