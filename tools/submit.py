#!/usr/bin/env python
"""Launch pretrain / finetune / linear_probe / lazyconfig_train_net on a SLURM cluster
(submitit): N nodes x G GPUs, requeued after a preemption or time-out with a checkpoint.

    python tools/submit.py --nodes 8 --gpus-per-node 8 --partition learn --time 72:00:00 \\
        pretrain --config configs/pretrain/revcolv2_base.yaml --data-path /data/imagenet

The code is in :mod:`revcolv2.cli.submit`; ``--help`` lists the options.
"""
from revcolv2.cli.submit import main

if __name__ == "__main__":
    main()
