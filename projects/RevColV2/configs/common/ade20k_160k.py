"""What the ADE20K configs of both frameworks share (UperNet and Mask2Former, B and L): the
loaders of ``ade20k_loader.py`` and the paper's schedule, 160k iterations at batch 16, in
bf16 on GPUs. Each framework's config adds its output folder, evaluation period,
learning-rate schedule and optimizer; the demos (``ade20k_synthetic_demo.py``) start here too.
"""
from detectron2 import model_zoo

from .ade20k_loader import dataloader, test

# A RevColV2 MIM (or ImageNet fine-tuned) checkpoint of the same size; its keys are mapped
# to backbone.net.* by the RevColV2Checkpointer. No public weights exist.
train = model_zoo.get_config("common/train.py").train
train.compile = False  # True: torch.compile the backbone (compile_levels() when reversible), docs/DETECTION.md
train.init_checkpoint = ""
train.amp.enabled = True  # Mask2Former's Base yaml SOLVER.AMP.ENABLED (for UperNet: ours)
train.amp.precision = "bf16"  # or "fp16"; mixed precision is switched off on CPU
train.ddp.fp16_compression = True
train.max_iter = 160000  # [paper] both frameworks; Mask2Former's Base yaml SOLVER.MAX_ITER
train.checkpointer.max_to_keep = 3  # ours: detectron2 keeps 100; plus model_final.pth
train.log_period = 50

dataloader.train.total_batch_size = 16  # [paper] both frameworks; Mask2Former's Base yaml SOLVER.IMS_PER_BATCH
