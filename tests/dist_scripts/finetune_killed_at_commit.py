"""launchers/finetune.py, except that the whole job is SIGKILLed (its process group: launcher,
ranks, DataLoader workers) the moment the first checkpoint's `latest` pointer is written: the
worst case of a crash right after a commit, without a test's polling delay.

    deepspeed --num_gpus 2 tests/dist_scripts/finetune_killed_at_commit.py [training flags]
"""

import os
import signal
import sys

from patchrec_dist.train import checkpoint
from patchrec_dist.train.config import parse_config
from patchrec_dist.train.signals import run_rank
from patchrec_dist.train.trainer import train


def kill_after_latest(write):
    def wrapped(url: str, data: bytes, *args, **kwargs) -> None:
        write(url, data, *args, **kwargs)
        if url.endswith(f"/{checkpoint.CHECKPOINTS_DIR}/{checkpoint.LATEST_FILE}"):
            print(f"killing the job: {url} = {data.decode().strip()}", flush=True)
            os.killpg(os.getpgid(0), signal.SIGKILL)
    return wrapped


if __name__ == "__main__":
    checkpoint.write_bytes_atomic = kill_after_latest(checkpoint.write_bytes_atomic)
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds it first
    run_rank(lambda: train(parse_config(args, defaults={"stage": "pft-s"})))
