"""The process group and this rank's device, the same way for training and evaluation.

On GPUs the rank's device is set before the process group exists: NCCL binds a communicator to
the current device, and a rank that has not chosen one runs every collective on cuda:0 (the
multi-GPU evaluation that did this failed at its final gather, after all generation was done).
On CPU the group is gloo (DeepSpeed adds its shared-memory all-reduce for training).
"""

from __future__ import annotations

import datetime
import glob
import os

import torch
import torch.distributed as dist


def local_device() -> torch.device:
    """cuda:LOCAL_RANK where CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def launched() -> bool:
    """Whether a launcher started this process as a rank (it sets WORLD_SIZE and MASTER_ADDR)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "MASTER_ADDR" in os.environ


def init_distributed(timeout_s: int, deepspeed_comm: bool = True) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Joins the process group the launcher describes (RANK,
    WORLD_SIZE, MASTER_ADDR/PORT); without DEEPSPEED_COMM a process that no launcher started
    runs alone. DEEPSPEED_COMM: through deepspeed.init_distributed (training: the
    engine uses DeepSpeed's comm layer); else torch's own (evaluation)."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if deepspeed_comm:
        import deepspeed

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # one warning per node
            warn_stale_build_locks()
        if not launched():
            # a plain `python launchers/finetune.py`: a world of one, as torchrun and the HF Trainer
            # allow (without these DeepSpeed looks for an MPI launcher and fails on mpi4py)
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        release_shm_names()
    elif launched() and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


#: A JIT build of a DeepSpeed op takes seconds to minutes; a lock older than this is a dead build's.
STALE_BUILD_LOCK_S = 900.0


def warn_stale_build_locks(root: str | None = None, max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Warn (stderr) about torch extension build locks older than MAX_AGE_S, and return them.

    DeepSpeed JIT-builds its CPU ops (the shm all-reduce, CPU Adam) through torch's cpp_extension,
    which holds ROOT/<ext>/lock while it builds. A build killed mid-way leaves the lock, and every
    later launch waits on it forever, silently (seen here: a CI run killed at the wrong moment hung
    every DeepSpeed start after it). Removing the file is the fix; a live build is not old."""
    import sys
    import time

    if root is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR")
        if root is None:
            from torch.utils.cpp_extension import get_default_build_root

            root = get_default_build_root()
    stale = [path for path in glob.glob(os.path.join(root, "**", "lock"), recursive=True)
             if time.time() - os.path.getmtime(path) > max_age_s]
    for path in stale:
        print(f"warning: {path} is {(time.time() - os.path.getmtime(path)) / 60:.0f} min old: a DeepSpeed op build "
              "that died left it, and DeepSpeed will wait on it forever. Remove it if no build is running.",
              file=sys.stderr)
    return stale


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous port of a job that picks its own)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def release_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped it.

    DeepSpeed's shm comm op (CPU accelerator) creates a 69 MB /dev/shm segment per rank and never
    unlinks it, so every launch leaks that much RAM until reboot (tmpfs). Its initialize maps all
    peers' segments before returning; after a barrier the names are no longer needed, and the
    memory is freed when the last process unmaps it."""
    if not dist.is_initialized() or torch.cuda.is_available():
        return
    dist.barrier()
    port, rank = os.environ.get("MASTER_PORT", "*"), dist.get_rank()
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass
