#!/usr/bin/env python
"""Patch fine-tuning (PFT): `deepspeed [--num_gpus N] launchers/finetune.py --data URL --init runs/pretrain ...`

Defaults to PFT-S (g = 5); --stage pft-i, text or budget for the others. Exit 75 means "stopped
on a signal at a checkpoint: run me again (the same command) to resume".
"""

from patchrec_dist.train.config import parse_config
from patchrec_dist.train.preflight import check_train
from patchrec_dist.train.signals import run_job
from patchrec_dist.train.trainer import train

if __name__ == "__main__":
    run_job("finetune", lambda: parse_config(defaults={"stage": "pft-s"}, description=__doc__), train, check_train)
