"""RevColV2-B UperNet on ADE20K, 160k iterations (paper's ADE20K recipe: docs/TRAINING.md, recipe sources).

batch 16, AdamW lr 4e-5 (at batch 16), weight decay 0.05, layer decay 0.65, drop path 0.1;
poly schedule (power 1) after a 1500-iteration linear warm-up; 512x512 crops.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file projects/RevColV2/configs/ADE20K/upernet_revcolv2_b_160k.py \
        train.init_checkpoint=/path/to/revcolv2_base_mim.pth
    # whole-image instead of sliding-window evaluation:
    python tools/lazyconfig_train_net.py --eval-only --config-file ... \
        train.init_checkpoint=output/ade20k_upernet_revcolv2_b/model_final.pth model.test_mode=whole
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from revcolv2_d2.backbone import revcolv2_optimizer_params

from ..common.ade20k_160k import dataloader, test, train
from ..common.upernet_revcolv2 import model

train.output_dir = "output/ade20k_upernet_revcolv2_b"
train.eval_period = 16000
train.checkpointer.period = 16000

# linear warm-up over 1500 iterations from 1e-6x, then poly (power 1) decay to 0 over the
# remaining 158,500 iterations (mmsegmentation's LinearLR + PolyLR)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=1.0),
    warmup_length=1500 / train.max_iter,
    warmup_factor=1e-6,
    rescale_interval=True,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 4e-5
optimizer.betas = (0.9, 0.999)
optimizer.weight_decay = 0.05
# layer decay 0.65 through the shared RevCol layer-id rule (revcolv2/layer_decay.py), with the
# layer ids of the built model (the training script sets optimizer.params.model)
optimizer.params = L(revcolv2_optimizer_params)(
    base_lr="${..lr}",
    layer_decay=0.65,
    weight_decay_norm=0.0,
    overrides={"alphas": {"weight_decay": 0.0}},  # reversible-unit scales
)
