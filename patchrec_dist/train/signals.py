"""Graceful stop on a signal: handlers only set a flag; ranks agree at a step boundary.

Why this shape (see docs/design.md, "Hard constraints"):

- A signal handler runs between two bytecodes of whatever the main thread was doing, possibly
  in the middle of a collective. Saving a ZeRO-3 checkpoint from there deadlocks (every rank
  must call ``save_checkpoint`` with the same tag, at the same point). So the handler only
  records that a stop was asked for.
- The signal usually reaches only some ranks: SLURM's ``--signal`` goes to the batch step or to
  the tasks, submitit's checkpoint hook runs on rank 0 only, the deepspeed launcher and
  torchrun do not forward SIGUSR1/SIGUSR2. :meth:`StopFlag.should_stop` all-reduces (MAX) the
  local flag at a step boundary, so if any rank got the signal every rank sees ``True`` at the
  same step; then every rank saves and exits with :data:`RESUME_EXIT_CODE`.
- DataLoader workers are forked from the training process and inherit its Python-level signal
  handlers. In a worker the handler does nothing at all (it checks ``os.getpid()`` against the
  pid that installed it): the worker keeps serving batches until the main process, which saw
  the signal too or hears of it through the all-reduce, saves and shuts the DataLoader down.

Typical loop::

    stop = StopFlag()                      # SIGUSR1, SIGUSR2 and SIGTERM
    for step in range(start, total):
        train_one_step(...)
        if stop.should_stop(engine):       # collective: every rank, every step
            ckpt.save(engine, step + 1, state)
            sys.exit(RESUME_EXIT_CODE)
    stop.restore()
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Exit status that means "stopped on purpose at a checkpoint, start me again to resume".
#: 75 is ``EX_TEMPFAIL`` from BSD's sysexits.h ("temporary failure; the user is invited to
#: retry"): distinct from 0 (finished), 1 (crash), 128+N (killed by signal N) and the usual
#: shell codes, so a SLURM epilog, submitit wrapper or shell loop can requeue on exactly this.
RESUME_EXIT_CODE = 75

DEFAULT_SIGNALS: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def _signal_number(sig: int | str | signal.Signals) -> int:
    if isinstance(sig, str):
        name = sig.upper()
        return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))
    return int(sig)


class StopFlag:
    """Flag set by SIGUSR1/SIGUSR2/SIGTERM (configurable); agreed on by all ranks via an all-reduce.

    ``signals``: numbers, ``signal.Signals`` or names (``"USR1"``, ``"SIGTERM"``).
    ``install``: install the handlers now (must be the main thread, as for ``signal.signal``).
    """

    def __init__(self, signals: Iterable[int | str | signal.Signals] = DEFAULT_SIGNALS, install: bool = True):
        self.signals: tuple[int, ...] = tuple(_signal_number(s) for s in signals)
        self._pid: int | None = None
        self._previous: dict[int, Any] = {}
        self._flag = False
        self.received: list[int] = []  # signal numbers seen by this process, in order
        self.agreed = False  # True once should_stop returned True
        if install:
            self.install()

    # -- handlers -------------------------------------------------------------------------
    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopFlag.install() must run in the main thread (Python delivers signals there)")
        if self._previous:
            return self
        self._pid = os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        # Only set a flag. In a forked child (DataLoader worker) do nothing at all.
        if os.getpid() != self._pid:
            return
        self._flag = True
        self.received.append(signum)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if not self._previous:
            return
        if os.getpid() == self._pid:
            for sig, old in self._previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- state ----------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """This process's flag (no communication)."""
        return self._flag

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received, e.g. ``"SIGUSR1"``; None if none (or requested in code)."""
        return signal.Signals(self.received[0]).name if self.received else None

    def request(self) -> None:
        """Set the flag from code (e.g. a submitit checkpoint hook or a wall-clock budget)."""
        self._flag = True

    def should_stop(self, engine_or_group: Any = None) -> bool:
        """Collective: True on every rank iff any rank's flag is set. Call on every rank, at the
        same step boundary (e.g. after ``engine.step()``), every step.

        ``engine_or_group``: a DeepSpeed engine (the all-reduce spans the world group), a
        ``torch.distributed`` ProcessGroup, or None (world group). Without an initialised
        process group the local flag is returned.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            agreed = self._flag
        else:
            group = engine_or_group if isinstance(engine_or_group, dist.ProcessGroup) else None
            device = _collective_device(dist.get_backend(group), engine_or_group)
            t = torch.tensor([1 if self._flag else 0], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            agreed = bool(t.item())
        if agreed:
            self.agreed = True
        return agreed


def _collective_device(backend: str, engine: Any) -> torch.device:
    backend = str(backend).lower()
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if engine is not None and isinstance(getattr(engine, "device", None), torch.device):
        return engine.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["DEFAULT_SIGNALS", "RESUME_EXIT_CODE", "StopFlag", "exit_process", "run_rank"]


def exit_process(code: int) -> None:
    """Leave the job together and exit with CODE without running C++ static destructors.

    A rank that exits with gloo / DeepSpeed shm threads still alive can abort in a destructor
    ("terminate called without an active exception", status -6), turning a clean stop (75) or
    success (0) into a crash for the launcher. So: barrier, tear the process group down, flush,
    and leave with os._exit."""
    import sys

    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - a broken group must not change the exit code
        print(f"process group teardown failed: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_rank(main: Callable[[], int | None]) -> None:
    """A rank's whole life: MAIN(), then exit_process with its code (None: 0). An exception is
    printed and ends the process at once with 1, and SystemExit with its code, without the
    teardown: after a peer died (its node lost) the rank raises from a collective, and a normal
    interpreter exit then waits on DataLoader workers and gloo threads that never finish (seen on
    two nodes: the rank hung after "Connection reset by peer", so its launcher never saw it fail).
    The launcher kills the rank's process group (its DataLoader workers) once it exited."""
    import sys
    import traceback

    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except BaseException:  # noqa: BLE001 - the point: whatever it is, the rank must end now
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    exit_process(0 if code is None else code)


def run_job(name: str, parse: Callable[[], Any], job: Callable[[Any], Any],
            check: Callable[[Any], None] | None = None) -> None:
    """A launcher's rank, start to end (run_rank): PARSE the flags, CHECK them (train.preflight)
    before any process group starts, then JOB(config); an int it returns is the exit status.

    Bad flags or input found by PARSE or CHECK: one line "NAME: error: ..." on stderr from rank 0
    only (every rank finds the same problem; one copy per rank buried it) and exit status 2 on
    every rank, so a launcher ends the job at once with 2. The same errors raised later by JOB
    (ValueError, FileNotFoundError: they may be one rank's own) are printed by each rank, exit 2."""
    import contextlib
    import io
    import sys

    from patchrec_dist.data.manifest import DataSetError

    bad_input = (ValueError, FileNotFoundError, DataSetError)

    def main() -> int:
        quiet = os.environ.get("RANK", "0") != "0"
        try:
            with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
                cfg = parse()
                if check is not None:
                    check(cfg)
        except bad_input as exc:
            if not quiet:
                print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        try:
            code = job(cfg)
        except bad_input as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        return code if isinstance(code, int) else 0

    run_rank(main)
