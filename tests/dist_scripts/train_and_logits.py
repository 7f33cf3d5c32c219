"""Train with the library's Trainer, then write the engine's logits for fixed ids (rank 0) so a test
can compare them with the exported model.

    deepspeed --num_gpus 2 tests/dist_scripts/train_and_logits.py LOGITS_OUT [training flags]
"""

import sys

import torch

from patchrec_dist.train.config import parse_config
from patchrec_dist.train.trainer import Trainer


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it first
    out = args[0]
    trainer = Trainer(parse_config(args[1:], defaults={"stage": "pft-s"}))
    trainer.setup()
    assert trainer.run() == 0
    ids = torch.arange(3, 40).reshape(1, -1) % len(trainer.tokenizer)
    logits = trainer.logits(ids)
    if trainer.rank == 0:
        torch.save({"ids": ids, "logits": logits}, out)
    print(f"RANK {trainer.rank} LOGITS OK", flush=True)


if __name__ == "__main__":
    from patchrec_dist.train.signals import exit_process

    main()
    exit_process(0)
