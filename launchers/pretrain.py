#!/usr/bin/env python
"""Patch pre-training (PPT): `deepspeed [--num_gpus N] launchers/pretrain.py --data URL --output DIR ...`

Every flag is listed by --help; docs/training.md explains them. Exit 75 means "stopped on a
signal at a checkpoint: run me again (the same command) to resume".
"""

from patchrec_dist.train.config import parse_config
from patchrec_dist.train.preflight import check_train
from patchrec_dist.train.signals import run_job
from patchrec_dist.train.trainer import train

if __name__ == "__main__":
    run_job("pretrain", lambda: parse_config(defaults={"stage": "ppt"}, description=__doc__), train, check_train)
