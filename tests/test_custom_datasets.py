"""Your own data in detectron2 (``revcolv2_d2.data.custom``, ``configs/custom/``): registration
from the ``dataset.*`` fields, the class count read from the data, the checks on bad data,
and the one rule for classes across model, dataset and checkpoint (``revcolv2_d2.classes``).

Datasets are written at test time (``custom_data_helpers``), never the built-in ones."""
import json
import logging
import os

import numpy as np
import pytest
import torch
from custom_data_helpers import CATEGORIES, SEM_CLASSES, write_coco_dataset, write_sem_seg_dataset
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from revcolv2_d2.checkpoint import RevColV2Checkpointer
from revcolv2_d2.classes import (
    ClassMismatchError,
    check_loaded_classes,
    check_model_fits_dataset,
    check_training_classes,
    checkpoint_num_classes,
    compare_class_names,
)
from revcolv2_d2.data.coco_checks import CocoInputError
from revcolv2_d2.data.custom import (
    CustomDatasetError,
    coco_num_classes,
    read_class_names,
    register_coco_format,
    register_config_datasets,
    register_sem_seg_folders,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM = os.path.join(ROOT, "projects", "RevColV2", "configs", "custom")
COCO_CONFIG = os.path.join(CUSTOM, "mask_rcnn_revcolv2_b_coco_format.py")
SEM_CONFIG = os.path.join(CUSTOM, "upernet_revcolv2_b_sem_seg_folders.py")
COCO_TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"]
SEM_TINY = ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
            "model.sem_seg_head.aux_channels=8"]


def _load(path, overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(path), list(overrides))


@pytest.fixture
def coco(tmp_path):
    return write_coco_dataset(tmp_path / "coco")


@pytest.fixture
def sem(tmp_path):
    return write_sem_seg_dataset(tmp_path / "sem")


# ------------------------------------------------------------------------- COCO format
def test_coco_format_registers_both_splits_with_the_files_categories(coco):
    names = register_coco_format("t_coco", **coco)
    assert names == {"train": "t_coco_train", "val": "t_coco_val"}
    meta = MetadataCatalog.get("t_coco_val")
    # known before anything is loaded: class names in id order, ids 3/7/12 mapped to 0/1/2
    assert meta.thing_classes == ["lamp", "chair", "plant"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
    assert meta.evaluator_type == "coco" and meta.json_file == coco["val_json"]
    records = DatasetCatalog.get("t_coco_train")
    assert len(records) == 6
    with open(coco["train_json"]) as f:
        data = json.load(f)
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    got = records[0]["annotations"]
    assert [a["category_id"] for a in got] == [{3: 0, 7: 1, 12: 2}[a["category_id"]] for a in first]
    assert records[0]["file_name"] == os.path.join(coco["train_images"], "train_000.jpg")


def test_num_classes_follows_the_categories_and_the_splits_must_agree(coco):
    assert coco_num_classes(coco["train_json"]) == coco_num_classes("", coco["val_json"]) == len(CATEGORIES)
    with open(coco["val_json"]) as f:
        data = json.load(f)
    data["categories"][1]["name"] = "sofa"
    with open(coco["val_json"], "w") as f:
        json.dump(data, f)
    with pytest.raises(CustomDatasetError, match=r"categories of .*train\.json and .*val\.json differ.*7:chair"
                                                 r".*7:sofa"):
        coco_num_classes(coco["train_json"], coco["val_json"])
    with pytest.raises(CustomDatasetError, match="dataset.train_json=PATH"):
        coco_num_classes("", "")


def test_an_image_missing_on_disk_is_an_error_naming_it(coco):
    os.remove(os.path.join(coco["train_images"], "train_004.jpg"))
    register_coco_format("t_missing", **coco)
    with pytest.raises(CustomDatasetError, match=r"1 of the 6 images listed in .*train\.json are missing under "
                                                 r".*train: .*train_004\.jpg"):
        DatasetCatalog.get("t_missing_train")
    assert len(DatasetCatalog.get("t_missing_val")) == 3  # the other split is fine


def test_a_split_not_given_says_which_overrides_to_set(coco):
    register_coco_format("t_half", train_json=coco["train_json"], train_images=coco["train_images"])
    with pytest.raises(CustomDatasetError, match=r"t_half_val has no data: set dataset.val_json=\.\.\. "
                                                 r"dataset.val_images=\.\.\."):
        DatasetCatalog.get("t_half_val")
    with pytest.raises(CustomDatasetError, match=r"dataset.train_images not set, but dataset.train_json is"):
        register_coco_format("t_bad", train_json=coco["train_json"])
    with pytest.raises(CustomDatasetError, match=r"no data given: set dataset.train_json"):
        register_coco_format("t_none")
    with pytest.raises(CustomDatasetError, match=r"dataset.train_images=/no/such: no such image folder"):
        register_coco_format("t_bad", train_json=coco["train_json"], train_images="/no/such")


def test_a_broken_annotation_file_names_the_file(coco):
    with open(coco["train_json"], "w") as f:
        f.write("{not json")
    with pytest.raises(CocoInputError, match=r"train\.json is not valid JSON"):
        register_coco_format("t_broken", **coco)


@pytest.mark.slow  # builds the model (a few seconds)
def test_the_custom_coco_config_builds_a_model_for_the_files_classes(coco):
    cfg = _load(COCO_CONFIG, COCO_TINY + [f"dataset.{k}={v}" for k, v in coco.items()])
    assert register_config_datasets(cfg) == {"train": "custom_train", "val": "custom_val"}
    model = instantiate(cfg.model)
    k = len(CATEGORIES)
    assert model.roi_heads.num_classes == k
    assert model.roi_heads.box_predictor.cls_score.out_features == k + 1
    assert model.roi_heads.mask_head.predictor.out_channels == k
    assert cfg.dataloader.test.dataset.names == "custom_val"
    assert check_model_fits_dataset(model, "custom_train", custom=True) == ["lamp", "chair", "plant"]
    # the schedule follows train.max_iter: steps at 8/9 and 26/27 of it
    cfg.train.max_iter = 270
    cfg.lr_multiplier.warmup_iters = 10
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == pytest.approx(0.001) and sched(10.5 / 270) == pytest.approx(1.0)
    assert sched(239.5 / 270) == pytest.approx(1.0) and sched(240.5 / 270) == pytest.approx(0.1)
    assert sched(260.5 / 270) == pytest.approx(0.01)


def test_a_class_count_override_that_contradicts_the_data_names_both_numbers(coco):
    cfg = _load(COCO_CONFIG, COCO_TINY + [f"dataset.{k}={v}" for k, v in coco.items()]
                + ["model.roi_heads.num_classes=5"])
    register_config_datasets(cfg)
    model = torch.nn.Module()  # what the check reads of the model the config builds
    model.roi_heads = torch.nn.Module()
    model.roi_heads.num_classes = instantiate(cfg.model.roi_heads.num_classes)
    with pytest.raises(ClassMismatchError, match=r"model.roi_heads.num_classes is 5 but dataset custom_train has 3 "
                                                 r"classes \(lamp, chair, plant\).*remove the override"):
        check_model_fits_dataset(model, "custom_train", custom=True)


# ------------------------------------------------------------------------- label PNGs
def test_sem_seg_folders_register_with_the_class_list(sem):
    names = register_sem_seg_folders("t_sem", classes=sem["classes"], **{k: v for k, v in sem.items()
                                                                         if k != "classes"})
    meta = MetadataCatalog.get(names["train"])
    assert meta.stuff_classes == SEM_CLASSES and meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    records = DatasetCatalog.get("t_sem_train")
    assert len(records) == 4
    for r in records:  # paired by name
        assert os.path.splitext(os.path.basename(r["file_name"]))[0] == \
            os.path.splitext(os.path.basename(r["sem_seg_file_name"]))[0]
    assert read_class_names(["a", "b"]) == ["a", "b"] and read_class_names(sem["classes"]) == SEM_CLASSES


def test_an_image_without_its_label_is_an_error_naming_it(sem):
    # equal counts on purpose: load_sem_seg alone would pair 0003.jpg with 9999.png
    os.rename(os.path.join(sem["train_labels"], "0003.png"), os.path.join(sem["train_labels"], "9999.png"))
    register_sem_seg_folders("t_unpaired", **sem)
    with pytest.raises(CustomDatasetError, match=r"1 image\(s\) without a label '\*\.png' in .*labels/train "
                                                 r"\(e\.g\. .*0003\.jpg\); 1 label\(s\) without an image.*9999\.png"):
        DatasetCatalog.get("t_unpaired_train")


def test_an_ignore_label_among_the_class_indices_is_refused(sem):
    with pytest.raises(CustomDatasetError, match=r"dataset.ignore_label=2: must be in 3..255"):
        register_sem_seg_folders("t_ign", ignore_label=2, **sem)
    with pytest.raises(CustomDatasetError, match="no class list given"):
        register_sem_seg_folders("t_ign", **{**sem, "classes": ""})


def _config_mapper(sem, split="train"):
    cfg = _load(SEM_CONFIG, SEM_TINY + [f"dataset.{k}={v}" for k, v in sem.items()])
    register_config_datasets(cfg)
    loader_cfg = cfg.dataloader.train if split == "train" else cfg.dataloader.test
    return cfg, instantiate(loader_cfg.mapper)


def test_the_custom_sem_seg_config_takes_the_class_count_from_the_list(sem):
    cfg, mapper = _config_mapper(sem)
    assert mapper.num_classes == len(SEM_CLASSES) and mapper.ignore_label == 255
    model = instantiate(cfg.model)
    assert model.sem_seg_head.num_classes == len(SEM_CLASSES)
    assert model.sem_seg_head.predictor.out_channels == len(SEM_CLASSES)
    assert check_model_fits_dataset(model, "custom_val", custom=True) == SEM_CLASSES
    record = DatasetCatalog.get("custom_train")[0]
    out = mapper(dict(record))
    assert out["sem_seg"].max() < len(SEM_CLASSES) or (out["sem_seg"] == 255).any()


def test_a_label_above_the_class_count_is_an_error_naming_the_file(sem):
    label = os.path.join(sem["train_labels"], "0001.png")
    values = np.array(Image.open(label))
    values[5, 5] = len(SEM_CLASSES)  # 3: one above the last class
    Image.fromarray(values, mode="L").save(label)
    _, mapper = _config_mapper(sem)
    record = [r for r in DatasetCatalog.get("custom_train") if r["sem_seg_file_name"] == label][0]
    with pytest.raises(ValueError, match=r"label .*0001\.png has values \[3\]: expected class indices 0..2 or 255"):
        mapper(dict(record))


def test_a_label_of_another_size_than_its_image_is_an_error_naming_both(sem):
    label = os.path.join(sem["val_labels"], "0000.png")
    Image.fromarray(np.zeros((30, 40), np.uint8), mode="L").save(label)
    _, mapper = _config_mapper(sem, "val")
    record = [r for r in DatasetCatalog.get("custom_val") if r["sem_seg_file_name"] == label][0]
    with pytest.raises(ValueError, match=r"label .*0000\.png is 40x30 .* but its image .*0000\.jpg is 104x72"):
        mapper(dict(record))


# ------------------------------------------------------------------------- classes and checkpoints
@pytest.fixture
def sem_model(sem):
    cfg = _load(SEM_CONFIG, SEM_TINY + [f"dataset.{k}={v}" for k, v in sem.items()])
    register_config_datasets(cfg)
    return instantiate(cfg.model)


def test_checkpoints_record_the_classes_and_the_backbone(sem_model, tmp_path):
    RevColV2Checkpointer(sem_model, str(tmp_path), classes=SEM_CLASSES).save("model_a")
    saved = torch.load(tmp_path / "model_a.pth", weights_only=True)
    assert saved["classes"] == SEM_CLASSES
    assert saved["config"]["model"]["name"] == "revcolv2_base"
    assert saved["config"]["model"]["kwargs"]["embed_dim"] == 32
    assert saved["config"]["model"]["kwargs"]["num_heads"] == 2
    assert checkpoint_num_classes(saved["model"]) == ("sem_seg_head.predictor.weight", 3)
    loader = RevColV2Checkpointer(sem_model)
    loader.load(str(tmp_path / "model_a.pth"))
    assert loader.loaded_detectron2 and loader.loaded_classes == SEM_CLASSES
    check_loaded_classes(loader, SEM_CLASSES, "custom_val")  # the same classes: accepted


def test_a_checkpoint_of_other_class_names_is_refused_with_both_lists(sem_model, tmp_path, caplog):
    other = ["floor", "wall", "door"]
    RevColV2Checkpointer(sem_model, str(tmp_path), classes=other).save("model_other")
    loader = RevColV2Checkpointer(sem_model)
    loader.load(str(tmp_path / "model_other.pth"))
    with pytest.raises(ClassMismatchError, match=r"model_other\.pth was trained on 3 classes that differ from the 3 "
                                                 r"classes of dataset custom_val: checkpoint \[floor, wall, door\] vs "
                                                 r"dataset \[floor, wall, window\]"):
        check_loaded_classes(loader, SEM_CLASSES, "custom_val")
    with caplog.at_level(logging.WARNING, logger="detectron2"):
        check_loaded_classes(loader, SEM_CLASSES, "custom_train", refuse=False)  # a new run: warned
    assert "trains them on custom_train" in caplog.text


def test_a_checkpoint_without_recorded_classes_is_accepted_with_a_note(sem_model, tmp_path, caplog):
    torch.save({"model": sem_model.state_dict()}, tmp_path / "plain.pth")
    loader = RevColV2Checkpointer(sem_model)
    loader.load(str(tmp_path / "plain.pth"))
    with caplog.at_level(logging.WARNING, logger="detectron2"):
        check_loaded_classes(loader, SEM_CLASSES, "custom_val")
    assert "plain.pth records no class names" in caplog.text and "not checked against the 3 classes" in caplog.text


def test_a_checkpoint_of_another_class_count_names_both_numbers(sem_model, tmp_path):
    sd = sem_model.state_dict()
    four = dict(sd)
    four["sem_seg_head.predictor.weight"] = torch.zeros(4, *sd["sem_seg_head.predictor.weight"].shape[1:])
    torch.save({"model": four}, tmp_path / "four.pth")  # no recorded names: read from the classifier
    with pytest.raises(ClassMismatchError, match=r"four\.pth: its classifier sem_seg_head.predictor.weight predicts "
                                                 r"4 classes but the model predicts 3 \(model.sem_seg_head.num_cl"):
        RevColV2Checkpointer(sem_model).load(str(tmp_path / "four.pth"))
    torch.save({"model": sd, "classes": ["a", "b"]}, tmp_path / "two.pth")  # recorded names
    with pytest.raises(ClassMismatchError, match=r"two\.pth was trained on 2 classes \(a, b\) but the model "
                                                 r"predicts 3"):
        RevColV2Checkpointer(sem_model).load(str(tmp_path / "two.pth"))


def test_training_and_evaluation_data_must_have_the_same_classes(sem, sem_model):
    register_sem_seg_folders("t_doors", val_images=sem["val_images"], val_labels=sem["val_labels"],
                             classes=["floor", "wall", "door"])
    assert check_training_classes(sem_model, "custom_train", "custom_val", custom=True) == SEM_CLASSES
    with pytest.raises(ClassMismatchError, match=r"the model \(on custom_train\) was trained on 3 classes that differ "
                                                 r"from the 3 classes of dataset t_doors_val: .*\[floor, wall, door\]"):
        check_training_classes(sem_model, "custom_train", "t_doors_val", custom=True)
    register_sem_seg_folders("t_two", val_images=sem["val_images"], val_labels=sem["val_labels"], classes=["a", "b"])
    with pytest.raises(ClassMismatchError, match=r"num_classes is 3 but dataset t_two_val has 2 classes"):
        check_training_classes(sem_model, "custom_train", "t_two_val", custom=True)


def test_long_class_lists_show_where_they_differ():
    a = [f"c{i}" for i in range(150)]
    b = list(a)
    b[37] = "other"
    msg = compare_class_names(a, b, "ckpt.pth", "ade")
    assert "1 position(s) differ" in msg and "37: 'c37' vs 'other'" in msg
    assert compare_class_names(a, list(a), "ckpt.pth", "ade") == ""


@pytest.mark.slow  # detectron2's drawing, a few seconds
def test_visualize_draws_a_custom_datasets_ground_truth_by_its_name(coco, tmp_path):
    from revcolv2_d2 import visualization

    written = visualization.main(["--config-file", COCO_CONFIG, "--dataset", "custom_val", "--num-images", "2",
                                  "--output", str(tmp_path / "gt"), "--opts"]
                                 + [f"dataset.{k}={v}" for k, v in coco.items()])
    assert [os.path.basename(p) for p in written] == ["val_000.png", "val_001.png"]
    drawn = np.asarray(Image.open(written[0]).convert("RGB")).astype(int)
    original = np.asarray(Image.open(os.path.join(coco["val_images"], "val_000.jpg")).convert("RGB")).astype(int)
    assert drawn.shape == original.shape and np.abs(drawn - original).mean() > 2  # boxes, masks and names drawn


def test_the_training_tools_help_names_the_custom_configs_and_tta():
    from revcolv2_d2.train_net import argument_parser

    text = argument_parser().format_help()
    assert "custom/mask_rcnn_revcolv2_b_coco_format.py" in text and "dataset.train_json=FILE" in text
    assert "custom/upernet_revcolv2_b_sem_seg_folders.py" in text and "dataset.classes=FILE" in text
    assert "test.aug.enabled=True" in text
    for config in (COCO_CONFIG, SEM_CONFIG):
        assert os.path.isfile(config)
