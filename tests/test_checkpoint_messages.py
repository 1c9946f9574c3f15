"""What ``revcolv2.checkpoint`` tells the user and allows, word for word: the line naming the
weights a checkpoint provides (EMA, raw, ``state_dict``, plain), the errors (which file,
which key, which shape), the load report, the grouped key lists, and the unpickler's
allowlist (exactly the names a numpy 1.x / 2.x pickle needs), built afresh for each fixture.
Written for the survivors of the mutation tool (docs/TESTING.md, "Mutation tool")."""
import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from revcolv2 import checkpoint as ck

FIXTURES = Path(__file__).parent / "fixtures" / "numpy_versions"


def _sd(value=1.0, prefix=""):
    return {prefix + "weight": torch.full((2, 3), value), prefix + "bias": torch.full((2,), value)}


@pytest.mark.parametrize("checkpoint, ema, key, line", [
    ({"model_ema": _sd(2.0), "model": _sd()}, True, "model_ema",
     "weights: run/x.pth: its EMA weights (--no-ema / ema=False takes 'model') ['model_ema']"),
    ({"model_ema": _sd(2.0)}, True, "model_ema", "weights: run/x.pth: its EMA weights ['model_ema']"),
    ({"model_ema": _sd(2.0)}, False, "model_ema",
     "weights: run/x.pth: its EMA weights, the only weights it holds ['model_ema']"),
    ({"model_ema": _sd(2.0), "model": _sd()}, False, "model",
     "weights: run/x.pth: its raw weights (EMA not wanted) ['model']"),
    ({"model": _sd(), "optimizer": {}}, True, "model",
     "weights: run/x.pth: its raw weights (no EMA weights in it) ['model']"),
    ({"state_dict": _sd(3.0, "module.")}, True, "state_dict", "weights: run/x.pth: its weights ['state_dict']"),
    (_sd(4.0), True, "state dict", "weights: run/x.pth: a plain state dict"),
])
def test_select_weights_says_which_weights_it_took(checkpoint, ema, key, line):
    lines = []
    sd, taken = ck.select_weights(checkpoint, ema=ema, source="run/x.pth", log=lines.append)
    assert lines == [line] and taken == key
    expected = checkpoint[key] if key != "state dict" else checkpoint
    assert set(sd) == {"weight", "bias"}  # the DDP prefix stripped
    assert all(torch.equal(sd[k], v) for k, v in zip(("weight", "bias"), expected.values()))


def test_select_weights_defaults_take_ema_print_and_call_the_source_checkpoint(capsys):
    sd, taken = ck.select_weights({"model_ema": _sd(2.0), "model": _sd()})
    assert taken == "model_ema" and torch.equal(sd["weight"], torch.full((2, 3), 2.0))
    assert capsys.readouterr().out == ("weights: checkpoint: its EMA weights (--no-ema / ema=False takes 'model') "
                                       "['model_ema']\n")
    raw = ck.unwrap_state_dict({"model_ema": _sd(2.0), "model": _sd()}, ema=False)
    assert torch.equal(raw["weight"], torch.full((2, 3), 1.0))
    assert torch.equal(ck.unwrap_state_dict({"model_ema": _sd(2.0), "model": _sd()})["weight"],
                       torch.full((2, 3), 2.0))
    assert capsys.readouterr().out == ""  # unwrap_state_dict prints nothing


def test_errors_name_the_source_and_what_is_wrong():
    with pytest.raises(ck.CheckpointError, match=r"^run/x\.pth holds a list, not a state dict$"):
        ck.select_weights([1, 2], source="run/x.pth", log=None)
    with pytest.raises(ck.CheckpointError, match=r"^checkpoint holds a list, not a state dict$"):
        ck.select_weights([1, 2], log=None)
    with pytest.raises(ck.CheckpointError, match=r"^run/x\.pth is not a state dict: key 3 is not a tensor name$"):
        ck.select_weights({"a": torch.zeros(1), 3: torch.zeros(1), 4: torch.zeros(1)}, source="run/x.pth", log=None)
    with pytest.raises(ck.CheckpointError, match=r"^checkpoint is not a state dict: key 3 is not a tensor name$"):
        ck.strip_ddp_prefix({3: torch.zeros(1)})
    with pytest.raises(ck.ShapeMismatchError) as e:
        ck.check_shapes({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 3)})
    assert str(e.value) == ("checkpoint: checkpoint tensor 'w' has shape (2, 3) but the model expects (3, 3): the "
                            "checkpoint is for a different model size") and e.value.source == "checkpoint"
    with pytest.raises(ck.ShapeMismatchError) as e:
        ck.check_shapes({"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 3)}, source="b.pth")
    assert e.value.source == "b.pth" and str(e.value).startswith("b.pth: checkpoint tensor 'w'")


def test_load_checkpoint_reports_and_prints_only_for_files_and_wrapped_dicts(tmp_path, capsys):
    model = nn.Linear(3, 2)
    report = ck.load_checkpoint(model, {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    assert capsys.readouterr().out == "loaded 2 tensors\n"  # a plain dict: no weights line
    assert report.loaded == ["weight", "bias"] and torch.equal(model.weight, torch.ones(2, 3))
    ck.load_checkpoint(model, {"model": {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}})
    assert capsys.readouterr().out == "weights: state dict: its raw weights (no EMA weights in it) ['model']\n" \
                                      "loaded 2 tensors\n"
    path = tmp_path / "c.pth"
    torch.save({"weight": torch.full((2, 3), 5.0), "bias": torch.zeros(2)}, path)
    ck.load_checkpoint(model, path)
    assert capsys.readouterr().out == f"weights: {path}: a plain state dict\nloaded 2 tensors\n"
    assert torch.equal(model.weight, torch.full((2, 3), 5.0))
    ck.load_checkpoint(model, path, verbose=False)
    assert capsys.readouterr().out == ""
    for key, note in (("model_ema", "its EMA weights"), ("state_dict", "its weights")):  # wrapped too
        ck.load_checkpoint(model, {key: {"weight": torch.ones(2, 3), "bias": torch.ones(2)}})
        assert capsys.readouterr().out == f"weights: state dict: {note} ['{key}']\nloaded 2 tensors\n"


def test_load_checkpoint_refuses_missing_or_unused_tensors_unless_allowed(capsys):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    sd = {"0.weight": torch.ones(2, 3), "0.bias": torch.ones(2), "head.weight": torch.ones(1)}
    with pytest.raises(ValueError) as e:
        ck.load_checkpoint(model, sd, verbose=False)
    assert str(e.value) == ("state dict does not match the model:\nloaded 2 tensors\n"
                            "missing in checkpoint (2): 1.weight, 1.bias\nunused from checkpoint (1): head.weight")
    with pytest.raises(ValueError, match=r"\nunused from checkpoint \(2\): head.weight, head.bias$"):
        ck.load_checkpoint(model, dict(sd, **{"head.bias": torch.ones(1)}), verbose=False)
    with pytest.raises(ValueError, match=r"^z\.pth does not match the model:\nloaded 2 tensors\n"):
        ck.load_checkpoint(model, sd, verbose=False, allow_missing=("1.",), source="z.pth")  # head.weight
    with pytest.raises(ValueError, match=r"missing in checkpoint \(2\): 1.weight, 1.bias\n"):
        ck.load_checkpoint(model, sd, verbose=False, allow_unexpected=("head",))  # still listed
    report = ck.load_checkpoint(model, sd, allow_missing=("1.",), allow_unexpected=("head",))
    assert (report.missing, report.unexpected) == (["1.weight", "1.bias"], ["head.weight"])
    assert capsys.readouterr().out == ("loaded 2 tensors\nmissing in checkpoint (2): 1.weight, 1.bias\n"
                                       "unused from checkpoint (1): head.weight\n")
    assert torch.equal(model[0].weight, torch.ones(2, 3))


def test_group_keys_groups_by_level_or_module_with_counts():
    keys = ([f"columns.2.levels.0.blocks.{i}.w" for i in range(3)] + ["columns.2.levels.1.b", "mask_token",
            "decoder_pred.weight", "decoder_pred.bias", "roi_heads.box_head.fc1.weight", "head.weight"])
    assert ck.group_keys(keys) == ("columns.2.levels.0.* (3), columns.2.levels.1.*, mask_token, decoder_pred.* (2), "
                                   "roi_heads.box_head.*, head.*")
    assert ck.group_keys(keys, limit=2) == "columns.2.levels.0.* (3), columns.2.levels.1.*, ... (4 more)"
    assert ck.group_keys([f"m{i}.w" for i in range(17)]) == ", ".join(f"m{i}.*" for i in range(16)) + ", ... (1 more)"
    assert ck.group_keys([f"m{i}.w" for i in range(16)]) == ", ".join(f"m{i}.*" for i in range(16))  # all shown


def _numpy_pickle_names():
    dtypes = {type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16,
                                         np.uint32, np.uint64, np.float16, np.float32, np.float64)} - {np.dtype}
    names = {("numpy", "ndarray"), ("numpy", "dtype")} | {(c.__module__, c.__name__) for c in dtypes}
    for spelling in ("numpy.core", "numpy._core"):
        names |= {(f"{spelling}.multiarray", "_reconstruct"), (f"{spelling}.multiarray", "scalar"),
                  (f"{spelling}.numeric", "_frombuffer")}
    return names


def test_the_unpicklers_allowlist_is_exactly_what_numpy_1_and_2_pickles_need():
    """Both numpy spellings of the array rebuilders, the dtype classes, ``bytes`` of
    protocols 0-2 (``_codecs.encode``) and ``OrderedDict`` (a state dict): nothing else."""
    import codecs

    allowed = ck._pickle_names()
    assert set(allowed) == _numpy_pickle_names() | {("collections", "OrderedDict"), ("_codecs", "encode")}
    assert allowed[("collections", "OrderedDict")] is collections.OrderedDict
    assert allowed[("_codecs", "encode")] is codecs.encode
    assert allowed[("numpy.core.numeric", "_frombuffer")] is allowed[("numpy._core.numeric", "_frombuffer")]
    assert allowed[("numpy.core.multiarray", "scalar")] is allowed[("numpy._core.multiarray", "scalar")]
    for (module, name), obj in allowed.items():
        assert obj.__name__ == name


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.pkl")))
def test_each_numpy_pickle_loads_with_an_allowlist_built_afresh(name, monkeypatch):
    monkeypatch.setattr(ck.RestrictedUnpickler, "_allowed", None)  # built by this load, not an earlier test's
    data = ck.load_file(FIXTURES / name)
    assert isinstance(data, dict) and data["numpy_version"].split(".")[0] == name[5]


def test_an_ordered_dict_pickle_loads_and_a_corrupt_pickle_is_not_called_unsafe(tmp_path, monkeypatch):
    monkeypatch.setattr(ck.RestrictedUnpickler, "_allowed", None)
    path = tmp_path / "sd.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(w=np.ones(2, np.float32)), protocol=2))
    loaded = ck.load_file(path)
    assert type(loaded) is collections.OrderedDict and np.array_equal(loaded["w"], np.ones(2))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3] + b"\xff\xff.")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_file(bad)
    assert str(e.value).startswith(f"{bad} is not a readable checkpoint") and "refusing" not in str(e.value)


def test_a_refusal_names_the_global_in_one_line(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_file(path)
    assert str(e.value) == (f"refusing to load {path}: it holds Python objects other than tensors, numbers, "
                            "strings, plain containers and numpy arrays (global 'os.system' is not allowed). "
                            "Unpickling them could run arbitrary code; RevColV2 never writes such objects, so this "
                            "file did not come from this project")
    assert ck._describe(ValueError("a\n  b   c\n")) == "a b c" and len(ck._describe(ValueError("x" * 400))) == 300
    assert ck._describe(RuntimeError("Weights only load failed.\n  WeightsUnpickler error: Unsupported global: "
                                      "GLOBAL os.system\nCheck the docs")) == \
        "WeightsUnpickler error: Unsupported global: GLOBAL os.system"


def test_a_payload_is_refused_even_where_the_environment_turns_torchs_default_unsafe(tmp_path, monkeypatch):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` makes ``torch.load``'s default unpickle
    anything; ``load_file`` asks for weights only itself, so the payload is still refused."""
    import os

    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ck.CheckpointError, match=r"^refusing to load .*evil\.pth: it holds Python objects"):
        ck.load_file(path)


def test_torchs_allowlist_holds_both_numpy_spellings_and_nothing_else():
    entries = ck._torch_safe_globals()
    objects = [e[0] if isinstance(e, tuple) else e for e in entries]
    assert all(callable(o) for o in objects)
    names = {e[1] if isinstance(e, tuple) else f"{e.__module__}.{e.__qualname__}" for e in entries}
    assert names == {".".join(n) for n in _numpy_pickle_names()}


def test_load_file_errors_say_what_the_file_is(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match=r"empty\.pth is empty \(0 bytes\): not a checkpoint"):
        ck.load_file(empty)
    one = tmp_path / "one.pth"
    one.write_bytes(b"x")
    with pytest.raises(ck.CheckpointError) as e:
        ck.load_file(one)
    assert "one.pth" in str(e.value) and "empty" not in str(e.value)  # one byte is not an empty file
    truncated = tmp_path / "t.pth"
    torch.save({"w": torch.ones(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ck.CheckpointError, match=r"t\.pth is not a readable checkpoint \(truncated, corrupt, or not a "
                                                 r"PyTorch/pickle file\): RuntimeError: PytorchStreamReader failed"):
        ck.load_file(truncated)
    corrupt = tmp_path / "c.pkl"
    corrupt.write_bytes(pickle.dumps({"a": 1}, protocol=2)[:-3] + b"\xff\xff.")
    with pytest.raises(ck.CheckpointError, match=r"c\.pkl is not a readable checkpoint \(corrupt or truncated\): "
                                                 r"invalid load key, '\\xff'\.$"):
        ck.load_file(corrupt)


def test_a_file_that_is_no_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(ck.CheckpointError, match=r"list\.pth is not a checkpoint: it holds a list, not a dict$"):
        ck.load_file(path)


def test_a_python_2_pickle_with_byte_strings_loads_as_latin1(tmp_path):
    """detectron2's model-zoo ``.pkl`` files were written by Python 2: their ``str`` are
    bytes, read as latin-1 (not ASCII, which fails on any byte above 127)."""
    path = tmp_path / "py2.pkl"
    path.write_bytes(b"\x80\x02}U\x04nameU\x02\xe9\xe8s.")  # {'name': '\xe9\xe8'} as Python 2 wrote it
    assert ck.load_file(path) == {"name": "\u00e9\u00e8"}


@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path, monkeypatch, mmap):
    """A file whose storages say ``cuda:0`` (as ``torch.save`` writes a GPU model's) loads onto
    the CPU, on a machine without CUDA too: torch alone would refuse it there, or put it on the
    GPU where there is one. The file is written here by tagging the storages as CUDA ones."""
    path = tmp_path / "gpu.pth"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"model": {"w": torch.arange(3.0)}}, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # what the file needs without map_location
            torch.load(path, weights_only=True)
    loaded = ck.load_file(path, mmap=mmap)
    assert loaded["model"]["w"].device == torch.device("cpu")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
