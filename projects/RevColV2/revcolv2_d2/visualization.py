"""Draw a RevColV2 detectron2 model's predictions (or a dataset's ground truth) on images.

The library half of ``tools/visualize.py`` (which only calls :func:`main`): a predictor
for LazyConfigs and the drawing functions, all on detectron2's ``Visualizer``, so that the
demo, the tests and the command line share them.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import secrets
from typing import Dict, Iterator, List, Optional

import cv2
import detectron2.data.transforms as T
import numpy as np
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from revcolv2.atomic_io import TMP_PREFIX, DiskFullError, inputs_replaced, write_bytes_atomic

from .checkpoint import RevColV2Checkpointer
from .classes import ClassMismatchError, check_loaded_classes, check_model_fits_dataset
from .data import register_all
from .data.custom import CustomDatasetError, register_config_datasets
from .safe_config import load_lazy_config

USAGE = """Draw a RevColV2 detectron2 model's predictions (or a dataset's ground truth) on images.

Predictions: boxes, masks, class names and scores (instance models), or a class-coloured
overlay with names (semantic segmentation models returning ``sem_seg``), drawn by
detectron2's ``Visualizer``:

    python tools/visualize.py --config-file CFG --checkpoint output/model_final.pth \
        --input img.jpg more/*.png a_folder/ clip.mp4 --output vis/ --confidence-threshold 0.5

Ground truth of a registered dataset (instances and/or ``sem_seg_file_name``), no model:

    python tools/visualize.py --dataset synthetic_shapes_val --output vis/ --num-images 8

Like detectron2's demo: ``--video-input`` for a video, ``key=value`` config overrides
after ``--opts``, runs on CPU (CUDA when available). Videos come back as ``<name>.mp4``.

Output names keep the inputs' folders below their common folder (``a/x.jpg`` and
``b/x.jpg`` give ``a/x.png`` and ``b/x.png``); two inputs that would still share a name
keep their extension in it (``a/x.jpg.png``, ``a/x.png.png``). Nothing is overwritten
silently: files of an earlier run that are replaced are counted in the log, and an output
that would replace an input (``--output`` the input folder) is refused before anything is
written. A drawing that cannot be written (a full disk, a file-size limit) stops the tool
with a line naming it; nothing is reported written that was not.
"""

logger = logging.getLogger("detectron2.visualize")

__all__ = ["LazyPredictor", "draw_predictions", "draw_ground_truth", "expand_inputs", "output_names",
           "visualize_video", "write_image", "VisualizationWriteError", "main"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


class LazyPredictor:
    """detectron2's ``DefaultPredictor`` for a LazyConfig: the test mapper's resize, the
    model's input format, outputs at the original resolution."""

    def __init__(self, cfg, checkpoint: str, device: Optional[str] = None, ema: bool = True):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = instantiate(cfg.model).to(self.device).eval()
        self.checkpointer = RevColV2Checkpointer(self.model, ema=ema)
        if checkpoint:
            self.checkpointer.load(checkpoint)
        else:
            logger.warning("No checkpoint given: drawing the predictions of an untrained model")
        mapper = cfg.dataloader.test.get("mapper", {}) if "dataloader" in cfg else {}
        self.augmentations = T.AugmentationList([instantiate(a) for a in mapper.get("augmentations", [])])
        self.input_format = mapper.get("image_format", cfg.model.get("input_format", "BGR"))

    def prepare(self, bgr: np.ndarray) -> Dict:
        """(H, W, 3) uint8 BGR -> the model's input dict: the test resize, the input format."""
        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        h, w = image.shape[:2]
        aug = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug)
        tensor = torch.as_tensor(np.ascontiguousarray(aug.image.transpose(2, 0, 1))).to(self.device)
        return {"image": tensor, "height": h, "width": w}

    @torch.no_grad()
    def __call__(self, bgr: np.ndarray) -> Dict:
        """(H, W, 3) uint8 BGR -> the model's output dict for that image."""
        return self.model([self.prepare(bgr)])[0]


def draw_predictions(rgb: np.ndarray, outputs: Dict, metadata, threshold: float) -> np.ndarray:
    """Draw instance and/or semantic predictions; returns an RGB uint8 image."""
    vis = Visualizer(rgb, metadata, instance_mode=ColorMode.IMAGE)
    out = None
    if "sem_seg" in outputs:
        out = vis.draw_sem_seg(outputs["sem_seg"].argmax(dim=0).cpu(), alpha=0.5)
    if "panoptic_seg" in outputs:
        seg, info = outputs["panoptic_seg"]
        out = vis.draw_panoptic_seg(seg.cpu(), info)
    if "instances" in outputs:
        instances = outputs["instances"].to("cpu")
        out = vis.draw_instance_predictions(instances[instances.scores >= threshold])
    if out is None:
        raise ValueError(f"the model returned none of instances / sem_seg / panoptic_seg: {sorted(outputs)}")
    return out.get_image()


def draw_ground_truth(record: Dict, metadata) -> np.ndarray:
    """Draw a dataset record's annotations and/or semantic labels; returns RGB uint8."""
    rgb = read_image(record["file_name"], format="RGB")
    return Visualizer(rgb, metadata).draw_dataset_dict(record).get_image()


def expand_inputs(inputs: List[str]) -> Iterator[str]:
    """Files, folders (their images and videos, sorted) and glob patterns -> file paths."""
    for item in inputs:
        if os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                if name.lower().endswith(IMAGE_EXTS + VIDEO_EXTS):
                    yield os.path.join(item, name)
        elif os.path.isfile(item):
            yield item
        else:
            matches = sorted(glob.glob(os.path.expanduser(item)))
            if not matches:
                raise FileNotFoundError(f"input not found: {item}")
            yield from matches


def output_names(paths: List[str], video: Optional[List[bool]] = None) -> List[str]:
    """One distinct output name per input path (relative to the output folder): the path
    below the inputs' common folder with its extension replaced by ``.png`` (``.mp4`` for a
    video); where two inputs would still share a name, each keeps its own extension in it
    (``x.jpg.png``, ``x.png.png``). Give each input once."""
    video = video or [False] * len(paths)
    folders = [os.path.dirname(os.path.abspath(p)) for p in paths]
    common = os.path.commonpath(folders) if folders else ""
    stems = [os.path.join(os.path.relpath(f, common), os.path.basename(p)) for f, p in zip(folders, paths)]
    stems = [os.path.normpath(s) for s in stems]
    suffixes = [".mp4" if v else ".png" for v in video]
    plain = [os.path.splitext(s)[0] + x for s, x in zip(stems, suffixes)]
    return [name if plain.count(name) == 1 else stem + x for name, stem, x in zip(plain, stems, suffixes)]


def _unique(paths: List[str]) -> List[str]:
    """``paths`` without repeats of one file (given as a file and inside a folder, say)."""
    seen, out = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def _prepare_outputs(output: str, names: List[str], inputs: List[str]) -> List[str]:
    """Full output paths for ``names``, their folders created; an output that would replace
    one of ``inputs`` is refused (:func:`refuse_replacing_inputs`) before anything is
    written, and files of an earlier run that will be replaced are counted in the log."""
    paths = [os.path.join(output, n) for n in names]
    refuse_replacing_inputs(inputs, paths, output)
    for folder in {os.path.dirname(p) for p in paths}:
        os.makedirs(folder, exist_ok=True)
    existing = [p for p in paths if os.path.exists(p)]
    if existing:
        logger.warning("Replacing %d file(s) of an earlier run in %s (e.g. %s)", len(existing), output, existing[0])
    return paths


class VisualizationWriteError(SystemExit):
    """A drawing that could not be written (a full disk, a file-size limit, no permission),
    or an output that would replace an input. A ``SystemExit``: the tool stops with this
    one-line message (status 1), which names the file, instead of reporting it written."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse_replacing_inputs(inputs: List[str], outs: List[str], output: str) -> None:
    """No drawing may replace an input, whatever the folder layout (``--output`` the input
    folder, a link to it, a hard link): checked before anything is drawn or written."""
    for out, given in inputs_replaced(outs, inputs):
        raise VisualizationWriteError(
            f"--output {output}: the drawing {out} would replace the input {given}; tools/visualize.py never "
            "writes over an input. Give --output another folder")


def write_image(path: str, rgb: np.ndarray) -> None:
    """Write an RGB drawing as ``path`` (its extension picks the format), whole or not at
    all: encoded in memory, written to a temporary file and renamed into place. A write that
    fails (``cv2.imwrite`` would only return False) is a :class:`VisualizationWriteError`
    naming the file, and nothing is left under its name."""
    ok, encoded = cv2.imencode(os.path.splitext(path)[1] or ".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise VisualizationWriteError(f"cannot encode the drawing for {path} (format {os.path.splitext(path)[1]!r})")
    try:
        write_bytes_atomic(path, encoded.tobytes())
    except DiskFullError as e:
        raise VisualizationWriteError(str(e)) from None
    except OSError as e:
        raise VisualizationWriteError(f"cannot write {path}: {e.strerror or e}; nothing was written under that "
                                      "name") from None


def read_bgr(path: str) -> np.ndarray:
    try:
        return read_image(path, format="BGR")
    except Exception as e:
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def visualize_video(path: str, out_path: str, predictor: LazyPredictor, metadata, threshold: float) -> int:
    """Predict every frame of a video and write the drawn frames as mp4; returns the count."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise ValueError(f"cannot open video file {path}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    writer, frames = None, 0
    # written under a temporary name, checked, then renamed: cv2.VideoWriter reports no failed write
    tmp = os.path.join(os.path.dirname(out_path) or ".",
                       f"{TMP_PREFIX}{os.getpid()}_{secrets.token_hex(6)}_{os.path.basename(out_path)}")
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            drawn = draw_predictions(bgr[:, :, ::-1], predictor(bgr), metadata, threshold)
            if writer is None:
                h, w = drawn.shape[:2]
                writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                if not writer.isOpened():
                    raise VisualizationWriteError(f"cannot open {out_path} for writing (video)")
            writer.write(np.ascontiguousarray(drawn[:, :, ::-1]))
            frames += 1
        if writer is not None:
            writer.release()
            written = cv2.VideoCapture(tmp)
            readable = written.isOpened() and int(written.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
            written.release()
            if not readable:
                raise VisualizationWriteError(f"cannot write {out_path}: the video written holds fewer than its "
                                              f"{frames} frames (a full disk or a file-size limit?); nothing was "
                                              "written under that name")
            os.replace(tmp, out_path)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
    if frames == 0:
        raise ValueError(f"no frame could be read from video file {path}")
    return frames


def metadata_for(cfg, name: Optional[str]):
    if name is None and cfg is not None and "dataloader" in cfg:
        names = cfg.dataloader.test.dataset.get("names", None)
        name = names if isinstance(names, str) else (names[0] if names else None)
    return MetadataCatalog.get(name) if name else MetadataCatalog.get("__unused")


def check_classes(predictor: LazyPredictor, name: str, custom: bool = False) -> None:
    """The names drawn are those of dataset ``name``: the model must predict its classes,
    and the checkpoint must have been trained on them (a checkpoint that records no class
    names is drawn with a note)."""
    if name == "__unused":
        return
    names = check_model_fits_dataset(predictor.model, name, custom)
    check_loaded_classes(predictor.checkpointer, names, name)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/visualize.py", description=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", help="a LazyConfig (.py); not needed with --dataset")
    p.add_argument("--checkpoint", default=None,
                   help="model weights (default: the config's train.init_checkpoint)")
    p.add_argument("--no-ema", action="store_true",
                   help="from a checkpoint with EMA weights (model_ema), draw with the raw ones ('model')")
    p.add_argument("--input", nargs="+", default=[], help="images, folders, glob patterns or videos")
    p.add_argument("--video-input", default=None, help="a video file (same as giving it to --input)")
    p.add_argument("--dataset", default=None,
                   help="draw this registered dataset's ground truth instead (with --config-file: also the datasets "
                        "its dataset.* overrides register, e.g. custom_val)")
    p.add_argument("--num-images", type=int, default=16, help="with --dataset: how many records to draw")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of drawn instances")
    p.add_argument("--metadata", default=None,
                   help="dataset whose class names to use (default: the config's test dataset)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides key=value ..., at the end of the command line")
    return p


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Run the tool; returns the written file paths."""
    args = get_parser().parse_args(argv)
    setup_logger(name="detectron2")
    register_all()
    os.makedirs(args.output, exist_ok=True)
    written: List[str] = []

    if args.dataset:
        try:
            if args.config_file:  # a custom config's data (its dataset.* overrides) by name
                register_config_datasets(LazyConfig.apply_overrides(load_lazy_config(args.config_file), args.opts))
            metadata = MetadataCatalog.get(args.metadata or args.dataset)
            records = DatasetCatalog.get(args.dataset)[: args.num_images]
        except CustomDatasetError as e:
            raise SystemExit(str(e)) from None
        files = [r["file_name"] for r in records]
        outs = _prepare_outputs(args.output, output_names(files), files)
        for record, out in zip(records, outs):
            write_image(out, draw_ground_truth(record, metadata))
            written.append(out)
        logger.info("Drew the ground truth of %d images of %s into %s", len(written), args.dataset, args.output)
        return written

    if not args.config_file:
        raise SystemExit("--config-file is needed to draw predictions (or give --dataset)")
    inputs = _unique(list(expand_inputs(args.input + ([args.video_input] if args.video_input else []))))
    if not inputs:
        raise SystemExit("no input: give --input (images, folders, videos) or --dataset")
    cfg = LazyConfig.apply_overrides(load_lazy_config(args.config_file), args.opts)
    videos = [p.lower().endswith(VIDEO_EXTS) for p in inputs]
    outs = _prepare_outputs(args.output, output_names(inputs, videos), inputs + [args.config_file])
    checkpoint = args.checkpoint if args.checkpoint is not None else cfg.train.get("init_checkpoint", "")
    try:
        register_config_datasets(cfg)  # a custom config's data (its dataset.* overrides)
        predictor = LazyPredictor(cfg, checkpoint, args.device, ema=not args.no_ema)
        metadata = metadata_for(cfg, args.metadata)
        check_classes(predictor, metadata.name, custom="dataset" in cfg)
    except (ClassMismatchError, CustomDatasetError) as e:
        raise SystemExit(str(e)) from None
    for path, is_video, out in zip(inputs, videos, outs):
        if is_video:
            n = visualize_video(path, out, predictor, metadata, args.confidence_threshold)
            logger.info("%s: %d frames -> %s", path, n, out)
        else:
            bgr = read_bgr(path)
            write_image(out, draw_predictions(bgr[:, :, ::-1], predictor(bgr), metadata, args.confidence_threshold))
        written.append(out)
    logger.info("Wrote %d visualizations to %s", len(written), args.output)
    return written

