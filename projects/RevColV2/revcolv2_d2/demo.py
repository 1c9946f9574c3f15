"""Main job: a RevColV2 Mask R-CNN learns the built-in shapes dataset on this CPU.

    make demo          # = python tools/demo.py --output output/demo

1. make the synthetic COCO-format dataset under $DETECTRON2_DATASETS if it is missing;
2. train projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py from scratch with
   tools/lazyconfig_train_net.py, which runs COCO evaluation on synthetic_shapes_val at the end;
3. draw the trained model's predictions on validation images (revcolv2_d2.visualization, the
   code of tools/visualize.py), next to
   the ground truth;
4. print box / mask AP and the wall time; fail if box AP50 stays below the target.

An ``<output>/train`` folder that holds an earlier run is never deleted silently: the demo
stops and offers ``--resume`` (continue that run), another ``--output``, or
``--overwrite`` (delete it and train again).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

_PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # projects/RevColV2
_ROOT = os.path.dirname(os.path.dirname(_PROJECT))  # the repository
CONFIG = os.path.join(_PROJECT, "configs", "demo", "mask_rcnn_revcolv2_tiny_shapes.py")
TARGET_BOX_AP50 = 50.0


def holds_run(folder: str) -> bool:
    """Whether ``folder`` holds a detectron2 training run (checkpoints, pointer, metrics,
    evaluation), by the rule of ``tools/lazyconfig_train_net.py``."""
    from revcolv2.run_dir import run_files
    from revcolv2_d2.train_net import DETECTRON2_RUN

    return bool(run_files(folder, DETECTRON2_RUN))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="output/demo")
    ap.add_argument("--num-vis", type=int, default=8, help="validation images to draw")
    ap.add_argument("--resume", action="store_true", help="continue the run in <output>/train")
    ap.add_argument("--overwrite", action="store_true", help="delete the run in <output>/train and train again")
    ap.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                    help="extra config overrides for training, key=value (e.g. train.max_iter=100)")
    args = ap.parse_args(argv)
    start = time.time()
    train_dir = os.path.join(args.output, "train")
    vis_dir, gt_dir = os.path.join(args.output, "predictions"), os.path.join(args.output, "ground_truth")

    # never delete an earlier run silently
    if holds_run(train_dir) and not args.resume:
        if not args.overwrite:
            raise SystemExit(
                f"[demo] {train_dir} holds an earlier training run. Continue it with --resume, "
                f"write elsewhere with --output DIR (make demo OUTPUT=DIR), or delete it and train "
                f"again with --overwrite."
            )
        print(f"[demo] --overwrite: deleting the earlier run in {train_dir}", flush=True)
        shutil.rmtree(train_dir)

    # 1. data
    from revcolv2_d2.data import datasets_root
    from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes
    from revcolv2_d2.visualization import main as visualize

    t = time.time()
    data_dir = ensure_synthetic_shapes(datasets_root())
    print(f"[demo] data: {data_dir} ready ({time.time() - t:.0f} s)", flush=True)

    # 2. train + COCO evaluation
    cmd = [sys.executable, os.path.join(_ROOT, "tools", "lazyconfig_train_net.py"),
           "--config-file", CONFIG, *(["--resume"] if args.resume else []), f"train.output_dir={train_dir}",
           *args.opts]
    print("[demo] " + " ".join(cmd), flush=True)
    t = time.time()
    # passive OpenMP waiting: with 2 cores, spinning threads starve the data loader (and any
    # other process) and can make a step several times slower
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    subprocess.run(cmd, check=True, env=env)
    train_time = time.time() - t
    with open(os.path.join(train_dir, "last_eval.json")) as f:
        metrics = json.load(f)

    # 3. visualizations of predictions on validation images, and their ground truth
    val_images = os.path.join(data_dir, "val")
    inputs = [os.path.join(val_images, n) for n in sorted(os.listdir(val_images))[: args.num_vis]]
    drawn = visualize(["--config-file", CONFIG, "--checkpoint", os.path.join(train_dir, "model_final.pth"),
                            "--output", vis_dir, "--confidence-threshold", "0.5", "--input", *inputs])
    visualize(["--dataset", "synthetic_shapes_val", "--num-images", str(args.num_vis), "--output", gt_dir])

    # 4. report
    wall = time.time() - start
    box, segm = metrics.get("bbox", {}), metrics.get("segm", {})
    summary = {
        "box_AP": box.get("AP"), "box_AP50": box.get("AP50"),
        "mask_AP": segm.get("AP"), "mask_AP50": segm.get("AP50"),
        "train_and_eval_seconds": round(train_time, 1), "wall_seconds": round(wall, 1),
        "visualizations": vis_dir, "ground_truth": gt_dir,
    }
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = (box.get("AP50") or 0.0) >= TARGET_BOX_AP50
    print("\n[demo] RevColV2 Mask R-CNN (tiny, from scratch) on synthetic_shapes_val:")
    print(f"[demo]   box  AP {_metric(box, 'AP')}  AP50 {_metric(box, 'AP50')}")
    print(f"[demo]   mask AP {_metric(segm, 'AP')}  AP50 {_metric(segm, 'AP50')}")
    print(f"[demo]   wall time {wall / 60:.1f} min (training + evaluation {train_time / 60:.1f} min)")
    print(f"[demo]   {len(drawn)} visualizations in {vis_dir} (ground truth in {gt_dir})")
    print(f"[demo]   box AP50 target {TARGET_BOX_AP50:.0f}: {'reached' if ok else 'NOT reached'}")
    return 0 if ok else 1


def _metric(results: dict, key: str) -> str:
    """A metric of ``last_eval.json`` for the summary; ``null`` there (NaN) is shown as nan."""
    value = results.get(key)
    return "nan" if value is None else f"{value:.1f}"
