"""The deliberate breaks of the mutation sweep (run them with ``sweep.py``; list: docs/TESTING.md).

Each is one change of the kind a refactor introduces, given as an exact snippet of the
current code (``old``, which must occur exactly once in ``file``) and its broken form
(``new``); ``old`` may span a few lines for context, the change itself is one line (or one
pair of lines swapped). ``output`` says which real output changes, so that none of them is
an equivalent rewrite; ``tests`` are the pytest ids that must fail with the break applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Break:
    id: str
    file: str
    old: str
    new: str
    change: str  # the change, in words
    output: str  # the output that changes
    tests: Tuple[str, ...]


EXEC = "tests/test_execution_order.py"
DROP_PATH = f"{EXEC}::test_drop_path_keeps_branches_at_one_over_keep_probability_with_rates_in_execution_order"
NON_SQUARE = "tests/test_non_square_grids.py"
COLOUR = "tests/test_colour_order.py::test_mappers_decode_images_in_the_models_colour_order"
UPDATE = "tests/test_training_update.py"
REF = "tests/test_reference_formulas.py"
BF16_NORMS = f"{REF}::test_bf16_layer_norms_use_their_own_modules_weight_and_bias"
BLOCK = f"{REF}::test_a_block_is_its_formula"
LOGITS = f"{REF}::test_classifier_logits_are_the_formula"
TRAINING = f"{REF}::test_training_forward_is_the_formula_with_the_drawn_drop_path"
EXACT = "tests/test_bf16_exact.py"

BREAKS = [
    # ------------------------------------------------------------------ engine
    Break(
        "engine-backward-f-in-fp32", "revcolv2/reversible.py",
        "                with self.autocast_ctx():\n                    f = col.level_f(l, inp_, cross_, scales, hw)",
        "                with torch.autocast(self.device_type, enabled=False):\n"
        "                    f = col.level_f(l, inp_, cross_, scales, hw)",
        "the backward recomputes F_l outside the forward's autocast (fp32 where the forward ran bf16)",
        "bf16 parameter gradients of the reversible engine (error vs plain autograd 9.4e-9 -> 5e-3 to 9e-3)",
        ("tests/test_reversible.py::test_bf16_autocast_reversible_backward_close_to_autograd",),
    ),
    Break(
        "engine-prev-grad-without-alpha", "revcolv2/reversible.py",
        "                g_prev = (g * alpha).to(prev.dtype)",
        "                g_prev = g.to(prev.dtype)",
        "the gradient to the previous column's level forgets the factor alpha",
        "every gradient upstream of a second column",
        ("tests/test_engine_grads.py::test_float64_gradients_equal_plain_autograd",),
    ),
    Break(
        "engine-skip-cross-level", "revcolv2/plan.py",
        "                    c = self.cross_level(j, l)\n                    if c is not None:\n"
        "                        want.add(c)",
        "                    c = self.cross_level(j, l)\n                    if c is not None and False:\n"
        "                        want.add(c)",
        "ColumnPlan.counts forgets that a level reads the previous column's cross level",
        "the classifier's forward (a level it needs is not computed)",
        ("tests/test_engine_grads.py::test_classifier_builds_only_what_reaches_its_head_with_identical_logits",),
    ),
    # ------------------------------------------------------------------ round 4: wiring hidden by default parameters
    # (at their initial values every LayerNorm is the identity affine, both gammas and all
    # alphas are equal, biases are 0: each break below gave the initial model's outputs)
    Break(
        "bf16-norm1-reads-norm2-weight", "revcolv2/model.py",
        "w = bf16_affines([self.norm1.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias])",
        "w = bf16_affines([self.norm2.weight, self.norm1.bias, self.norm2.weight, self.norm2.bias])",
        "the bf16 path of a block's first LayerNorm reads norm2's weight",
        "every block's attention input under bf16 autocast (training and inference on GPU)",
        (BF16_NORMS,),
    ),
    Break(
        "fusion-bf16-reads-proj-bias", "revcolv2/layers.py",
        "w = bf16_affines([self.norm.weight, self.norm.bias])",
        "w = bf16_affines([self.norm.weight, self.proj.bias])",
        "the bf16 path of the fusion's LayerNorm takes the projection's bias for its own",
        "every fused cross-column input under bf16 autocast",
        (BF16_NORMS,),
    ),
    Break(
        "mlp-reads-norm1", "revcolv2/model.py",
        "m = self.mlp(bf16_layer_norm(x, w[2], w[3], self.norm2.eps) if len(w) > 0 else self.norm2(x))",
        "m = self.mlp(bf16_layer_norm(x, w[2], w[3], self.norm2.eps) if len(w) > 0 else self.norm1(x))",
        "the float32 path of a block normalises the MLP input with norm1",
        "every block's output in float32 (CPU, eval, TorchScript, ONNX)",
        (f"{BLOCK}[0-None]", f"{LOGITS}[top]"),
    ),
    Break(
        "gamma1-for-mlp", "revcolv2/model.py",
        "            m = m * self.gamma2",
        "            m = m * self.gamma1",
        "the MLP branch scaled by the attention branch's layer scale",
        "every block's output in a model built with layer_scale_init",
        (f"{BLOCK}[0-0.1]", f"{LOGITS}[top]"),
    ),
    Break(
        "alpha-by-execution-position", "revcolv2/model.py",
        "                alpha = alphas[l]\n",
        "                alpha = alphas[self.order.index(l)]\n",
        "a level's update takes the alpha row of its execution position, not of its level (TD columns)",
        "every TD level's state in the plain path (eval, inference, export)",
        (f"{LOGITS}[all]",),
    ),
    Break(
        "alpha-sign-dropped", "revcolv2/model.py",
        "        return torch.where(alphas >= 0, magnitude, -magnitude)",
        "        return magnitude",
        "the alpha clamp keeps the magnitude and drops the sign",
        "every update whose alpha turned negative in training",
        (f"{LOGITS}[top]", f"{EXACT}::test_alphas_are_clamped_and_applied_in_float32"),
    ),
    Break(
        "engine-alpha-by-execution-position", "revcolv2/reversible.py",
        "            alpha = alphas[l] if alphas is not None else None",
        "            alpha = alphas[col.order.index(l)] if alphas is not None else None",
        "the reversible engine's update takes the alpha row of its execution position (TD columns)",
        "every TD level's state and gradient in reversible training",
        (f"{TRAINING}[reversible]", "tests/test_engine_grads.py::test_float64_gradients_equal_plain_autograd"),
    ),
    Break(
        "engine-unstep-by-abs-alpha", "revcolv2/reversible.py",
        "            return self.columns[j].unstep(out, f, self.alphas[(j, l)]).to(self.dtypes[(j - 1, l)])",
        "            return self.columns[j].unstep(out, f, self.alphas[(j, l)].abs()).to(self.dtypes[(j - 1, l)])",
        "the engine's rebuild divides by |alpha|",
        "every rebuilt state (and the gradients after it) behind a negative alpha",
        (f"{TRAINING}[reversible]", "tests/test_engine_grads.py::test_float64_gradients_equal_plain_autograd"),
    ),
    # ------------------------------------------------------------------ round 4: numerics under bf16 autocast
    Break(
        "residual-scale-in-branch-dtype", "revcolv2/layers.py",
        "    scale = scale.view(-1, 1, 1).to(x.dtype)  # the result keeps the state's dtype",
        "    scale = scale.view(-1, 1, 1).to(branch.dtype)  # the result keeps the state's dtype",
        "the drop-path factor cast to the branch's dtype (bf16 under autocast) on its way to the update",
        "every kept branch under bf16 autocast: 1/0.9 applied as 1.109375",
        (f"{EXACT}::test_each_branch_is_scaled_by_exactly_0_or_one_over_keep_prob",),
    ),
    # ------------------------------------------------------------------ model wiring
    Break(
        "drop-path-unscaled", "revcolv2/model.py",
        "return (torch.rand(nc, batch, self.blocks_per_column, 2, device=device) < keep_prob).float() / keep_prob",
        "return (torch.rand(nc, batch, self.blocks_per_column, 2, device=device) < keep_prob).float()",
        "kept residual branches scaled by 1 instead of 1/(1-p)",
        "every block's output in training mode with drop path",
        (DROP_PATH,),
    ),
    Break(
        "drop-path-in-eval", "revcolv2/model.py",
        "if not self.training or self.drop_path_rate == 0:",
        "if self.drop_path_rate == 0:",
        "drop path also drawn in eval mode",
        "every evaluation / inference output of a model built with drop path",
        (f"{EXEC}::test_no_branch_is_dropped_or_scaled_in_eval_mode",),
    ),
    Break(
        "drop-path-rate-by-level-number", "revcolv2/model.py",
        "        pos = self.order.index(l) * self.blocks_per_level\n"
        "        return drop_scales[:, pos:pos + self.blocks_per_level]",
        "        pos = l * self.blocks_per_level\n        return drop_scales[:, pos:pos + self.blocks_per_level]",
        "a level takes the drop-path draws (and rate) of its level number, not its execution position",
        "TD blocks' drop rates: level 3 gets level 0's and the reverse",
        (DROP_PATH,),
    ),
    Break(
        "drop-path-rates-reversed", "revcolv2/model.py",
        '"drop_rates", torch.linspace(0, drop_path_rate, total_blocks), persistent=False',
        '"drop_rates", torch.linspace(drop_path_rate, 0, total_blocks), persistent=False',
        "stochastic depth decreasing with depth",
        "every block's drop rate",
        (DROP_PATH,),
    ),
    Break(
        "drop-path-one-draw-per-block", "revcolv2/model.py",
        "        x = residual_add(x, a, None if drop_scales is None else drop_scales[:, 0])",
        "        x = residual_add(x, a, None if drop_scales is None else drop_scales[:, 1])",
        "the attention branch uses the MLP branch's draw (both dropped together)",
        "which samples keep a block's attention branch in training",
        (DROP_PATH,),
    ),
    Break(
        "global-attention-by-level-number", "revcolv2/model.py",
        "g = j * self.blocks_per_column + pos * blocks_per_level + b",
        "g = j * self.blocks_per_column + l * blocks_per_level + b",
        "global_attn_indexes count TD blocks by level number, not execution order",
        "which TD blocks attend globally (detection configs: ViTDet's global blocks)",
        (f"{EXEC}::test_global_attention_indexes_count_blocks_in_execution_order",),
    ),
    Break(
        "pos-embed-grid-xy", "revcolv2/layers.py",
        '        indexing="ij",\n    )\n    out_y = ys.reshape(-1, 1) * omega',
        '        indexing="xy",\n    )\n    out_y = ys.reshape(-1, 1) * omega',
        "the position grid built as (w, h)",
        "the position embedding of every token on a non-square grid (transposed on a square one)",
        (f"{NON_SQUARE}::test_position_embedding_of_a_cell_is_the_square_grids",),
    ),
    Break(
        "pos-embed-h-w-swapped", "revcolv2/model.py",
        "pos = sincos_pos_embed_2d(hw[0], hw[1], self.embed_dim, tokens.device, tokens.dtype)",
        "pos = sincos_pos_embed_2d(hw[1], hw[0], self.embed_dim, tokens.device, tokens.dtype)",
        "the model asks for the embedding of a (w, h) grid",
        "the position embedding of every token on a non-square input",
        (f"{NON_SQUARE}::test_position_embedding_of_a_cell_is_the_square_grids",),
    ),
    Break(
        "feature-maps-w-h", "revcolv2/layers.py",
        "        return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[2]).permute(0, 3, 1, 2)",
        "        return tokens.reshape(tokens.shape[0], hw[1], hw[0], tokens.shape[2]).permute(0, 3, 2, 1)",
        "NCHW feature maps read the tokens column-major",
        "the detectron2 backbone's feature maps on every input",
        (f"{NON_SQUARE}::test_feature_maps_hold_each_token_at_its_row_and_column",),
    ),
    # ------------------------------------------------------------------ MIM
    Break(
        "patchify-column-major", "revcolv2/mim.py",
        'return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)',
        'return torch.einsum("bchpwq->bwhpqc", x).reshape(b, (h // p) * (w // p), p * p * c)',
        "patches listed column by column",
        "the reconstruction target of every patch but those on the diagonal",
        (f"{NON_SQUARE}::test_patch_targets_follow_the_image_in_raster_order",),
    ),
    Break(
        "norm-pix-divides-by-variance", "revcolv2/mim.py",
        "    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5",
        "    std = patches.var(dim=-1, keepdim=True) + eps",
        "the per-patch normalised target divided by the variance instead of the std",
        "the MIM target of every patch",
        ("tests/test_mim.py::test_targets_normalized_per_patch_or_raw",),
    ),
    Break(
        "mim-pixels-w-h", "revcolv2/mim.py",
        "return unpatchify(pred.float(), p, (imgs.shape[2] // p, imgs.shape[3] // p), imgs.shape[1])",
        "return unpatchify(pred.float(), p, (imgs.shape[3] // p, imgs.shape[2] // p), imgs.shape[1])",
        "predicted patches put back on a (w, h) grid",
        "the reconstruction picture of every non-square image (tools/visualize.py, TensorBoard)",
        (f"{NON_SQUARE}::test_predicted_patches_go_back_to_their_place_in_the_image",),
    ),
    # ------------------------------------------------------------------ data mappers and configs
    Break(
        "colour-coco-train-bgr", "projects/RevColV2/configs/common/coco_loader_lsj.py",
        'dataloader.train.mapper.image_format = "RGB"',
        'dataloader.train.mapper.image_format = "BGR"',
        "the COCO train mapper decodes BGR (the test mapper follows it)",
        "every detection training and test image: red and blue swapped for an RGB model",
        (COLOUR,),
    ),
    Break(
        "colour-coco-test-bgr", "projects/RevColV2/configs/common/coco_loader_lsj.py",
        "dataloader.test.mapper._target_ = CheckedDatasetMapper\n",
        'dataloader.test.mapper._target_ = CheckedDatasetMapper\ndataloader.test.mapper.image_format = "BGR"\n',
        "the COCO test mapper alone decodes BGR",
        "every detection evaluation image",
        (COLOUR,),
    ),
    Break(
        "colour-ade-train-bgr", "projects/RevColV2/configs/common/ade20k_loader.py",
        '            L(PhotometricDistortion)(),\n        ],\n        image_format="RGB",',
        '            L(PhotometricDistortion)(),\n        ],\n        image_format="BGR",',
        "the ADE20K train mapper decodes BGR",
        "every segmentation training image",
        (COLOUR,),
    ),
    Break(
        "colour-ade-test-bgr", "projects/RevColV2/configs/common/ade20k_loader.py",
        "target_width=scale[1]),\n        ],\n        image_format=\"RGB\",",
        "target_width=scale[1]),\n        ],\n        image_format=\"BGR\",",
        "the ADE20K test mapper decodes BGR",
        "every segmentation evaluation image",
        (COLOUR,),
    ),
    Break(
        "photometric-hsv-as-bgr", "projects/RevColV2/revcolv2_d2/data/ade20k.py",
        "cv2.cvtColor(img.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)",
        "cv2.cvtColor(img.clip(0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV)",
        "the photometric distortion converts its RGB image to HSV as if it were BGR",
        "segmentation training images after a saturation or hue step: red and blue swapped",
        (COLOUR,),
    ),
    Break(
        "coco-lsj-scale", "projects/RevColV2/configs/common/coco_loader_lsj.py",
        "lsj_scale = (0.1, 2.0)",
        "lsj_scale = (0.1, 1.0)",
        "large-scale jitter up to 1.0 instead of the paper's 2.0",
        "the scale distribution of detection training images",
        ("tests/test_coco_configs.py::test_recipe_values",),
    ),
    # ------------------------------------------------------------------ heads' targets
    Break(
        "mask2former-pad-as-class-0", "projects/RevColV2/revcolv2_d2/mask2former.py",
        "padded_hw[0] - h), value=self.ignore_value)",
        "padded_hw[0] - h), value=0)",
        "Mask2Former pads a smaller image's labels with class 0",
        "the class-0 target mask (and label list) of every image smaller than its batch",
        ("tests/test_mask2former.py::test_the_padding_of_a_smaller_image_is_no_class_in_its_targets",),
    ),
    Break(
        "upernet-aux-loss-no-ignore", "projects/RevColV2/revcolv2_d2/upernet.py",
        "                resize(aux_logits, size), targets, ignore_index=self.ignore_value",
        "                resize(aux_logits, size), targets",
        "the auxiliary loss counts ignored (255) pixels",
        "the auxiliary loss of any batch with ignored pixels",
        ("tests/test_upernet.py::test_training_returns_losses_and_gradients_reach_every_parameter",),
    ),
    # ------------------------------------------------------------------ training loop
    Break(
        "schedule-next-steps-lr", "revcolv2/trainer.py",
        "self.scheduler.step_update(self.step)  # lr of this update",
        "self.scheduler.step_update(self.step + 1)  # lr of this update",
        "update k uses the schedule's lr of update k + 1",
        "every update's lr (the first is no longer 0 under warm-up from 0)",
        (f"{UPDATE}::test_update_k_uses_the_schedules_lr_at_k_and_the_first_update_leaves_the_weights",),
    ),
    Break(
        "warmup-not-from-zero", "revcolv2/optim.py",
        "warmup_lr_init=0.0, warmup_prefix=True",
        "warmup_lr_init=1e-6, warmup_prefix=True",
        "warm-up starts at 1e-6 instead of 0",
        "the lr of every warm-up update",
        (f"{UPDATE}::test_update_k_uses_the_schedules_lr_at_k_and_the_first_update_leaves_the_weights",),
    ),
    Break(
        "layer-decay-scale-unread", "revcolv2/optim.py",
        '"lr_scale": lr_scale(name, layer_decay, *cfg),',
        '"lr_mult": lr_scale(name, layer_decay, *cfg),',
        "the layer-decay scale stored under a key timm's scheduler does not read",
        "every parameter group's lr in fine-tuning (all at the head's lr)",
        (f"{UPDATE}::test_layer_decay_scales_each_groups_lr_in_the_update",
         "tests/test_finetune.py::test_layer_decay_groups_cover_every_parameter_once_with_increasing_scale"),
    ),
    Break(
        "accumulation-not-averaged", "revcolv2/trainer.py",
        "self.scaler.scale(loss / self.accum).backward()",
        "self.scaler.scale(loss).backward()",
        "accumulated micro-batch losses summed instead of averaged",
        "the gradient (and the clipped update) of every accumulated update",
        (f"{UPDATE}::test_accumulating_two_micro_batches_is_one_update_over_their_batch",),
    ),
    Break(
        "clip-by-value", "revcolv2/trainer.py",
        "nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip_grad)",
        "nn.utils.clip_grad_value_([p for p in self.model.parameters() if p.requires_grad], self.clip_grad)",
        "gradients clipped element-wise instead of by their global norm",
        "every clipped update",
        (f"{UPDATE}::test_clipped_update_moves_the_weights_by_the_clip_norm",),
    ),
    Break(
        "ema-before-the-step", "revcolv2/trainer.py",
        "        self.scaler.step(self.optimizer)\n        self.scaler.update()\n"
        "        self.optimizer.zero_grad(set_to_none=True)\n        self.step += 1\n"
        "        self.step_in_epoch += 1\n        self.after_step()\n",
        "        self.after_step()\n        self.scaler.step(self.optimizer)\n        self.scaler.update()\n"
        "        self.optimizer.zero_grad(set_to_none=True)\n        self.step += 1\n"
        "        self.step_in_epoch += 1\n",
        "the EMA update moved before the optimizer step (the two steps swapped)",
        "the EMA weights after every update (one update behind)",
        (f"{UPDATE}::test_ema_follows_the_weights_each_update_produced",),
    ),
    # ------------------------------------------------------------------ checkpoints
    Break(
        "ddp-prefix-half-stripped", "revcolv2/checkpoint.py",
        'return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}',
        'return {k[len("module"):] if k.startswith("module.") else k: v for k, v in sd.items()}',
        "a DDP checkpoint's 'module.' prefix stripped one character short",
        "the weights loaded from a checkpoint written under DDP (none match)",
        ("tests/test_checkpoint.py::test_a_checkpoint_written_under_ddp_loads_the_same_weights",),
    ),
    Break(
        "rng-numpy-position", "revcolv2/rng.py",
        '"pos": int(pos),',
        '"pos": int(pos) + 1,',
        "the saved NumPy RNG position off by one",
        "every NumPy draw after a resume (augmentations)",
        ("tests/test_checkpoint_rule.py::test_rng_state_loads_with_weights_only_and_restores_exactly",),
    ),
    Break(
        "dense-checkpoint-prefix", "projects/RevColV2/revcolv2_d2/checkpoint.py",
        'return name + "." if name else ""',
        'return name if name else ""',
        "a RevColV2 checkpoint renamed to the dense model's names without the dot",
        "the backbone weights loaded by detection / segmentation (none match, the backbone keeps its init)",
        ("tests/test_d2_backbone.py::test_mim_checkpoint_loads_through_init_checkpoint",),
    ),
]
