"""The benchmarks of RevColV2: the machinery behind ``tools/benchmark_*.py``, split by job.

- :mod:`.cli`: the one benchmark command line (device defaults, ``--report``, ``--json``);
- :mod:`.measure`: timing, peak memory (RSS, CUDA, saved activations) and the fresh-process
  workers each row runs in;
- :mod:`.analysis`: the device-independent figures of a training step (activation peak,
  GFLOPs, block evaluations, non-GEMM traffic), from :mod:`.memory` and :mod:`.flops`;
- :mod:`.profiling`: ``torch.profiler`` traces turned into kernel time by kind and op chains;
- :mod:`.report`: markdown tables, ratio columns and the docs/BENCHMARKS.md editor;
- :mod:`.detectron2_runs`: training and inference figures of a detectron2 model;
- :mod:`.step_benchmark`: what the training-step benchmarks (backbone, pre-training) share;
- one module per benchmark: :mod:`.backbone`, :mod:`.pretrain`, :mod:`.detection`,
  :mod:`.segmentation`, :mod:`.gpu_targets` (each runnable as ``python -m``, which is how
  a benchmark starts its worker processes).

It imports ``revcolv2`` and (for the detection and segmentation benchmarks) detectron2 and
the ``revcolv2_d2`` project; ``revcolv2`` never imports it.
"""
