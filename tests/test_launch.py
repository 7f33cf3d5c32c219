"""patchrec_dist/launch.py without a cluster: the world a SLURM step gives, each rank's environment,
what the launcher decides when the ranks end, the lost-node probe, and the command line. The real
thing on a 2-node cluster: tests/test_multinode.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from patchrec_dist import launch
from patchrec_dist.launch import NodeLauncher, World
from patchrec_dist.train.signals import RESUME_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def slurm_step_env(monkeypatch, node: int, nodes: int = 3, job: str = "12345", restarts: int = 0) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NODEID", str(node))
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_STEP_NODELIST", f"gpu[{1}-{nodes}]")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    for var in ("PATCHREC_MASTER_ADDR", "PATCHREC_MASTER_PORT", "PATCHREC_FAILURE_REQUEUES", "PATCHREC_MAX_REQUEUES"):
        monkeypatch.delenv(var, raising=False)
    # scontrol show hostnames, without a controller
    monkeypatch.setattr(launch, "slurm_hostnames", lambda nodelist: [f"gpu{i}" for i in range(1, nodes + 1)])


def test_world_from_a_slurm_step(monkeypatch):
    slurm_step_env(monkeypatch, node=2)
    w = World.from_env(nproc=8)
    assert (w.nnodes, w.node_rank, w.size, w.master_addr) == (3, 2, 24, "gpu1")
    assert w.master_port == 20000 + 12345 % 20000  # the same on every node and after a requeue
    monkeypatch.setenv("PATCHREC_MASTER_PORT", "29999")
    monkeypatch.setenv("PATCHREC_MASTER_ADDR", "10.0.0.9")
    w = World.from_env(nproc=8)
    assert (w.master_addr, w.master_port) == ("10.0.0.9", 29999)


def test_world_outside_slurm_is_this_machine(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NODEID", "PATCHREC_MASTER_ADDR", "PATCHREC_MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    w = World.from_env(nproc=2)
    assert (w.nnodes, w.node_rank, w.size, w.master_addr) == (1, 0, 2, "127.0.0.1") and w.master_port > 0


def test_rank_environment_matches_deepspeeds_launcher(monkeypatch):
    """Node 2 of 3 with 4 ranks a node: global ranks 8-11, DeepSpeed's variables, its devices."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    node = NodeLauncher("launchers/finetune.py", ["--data", "d"], World(3, 2, 4, "gpu1", 23456))
    cmds = node.rank_commands()
    assert [env["RANK"] for _, env in cmds] == ["8", "9", "10", "11"]
    assert [env["LOCAL_RANK"] for _, env in cmds] == ["0", "1", "2", "3"]
    assert [argv[3] for argv, _ in cmds] == [f"--local_rank={i}" for i in range(4)]
    env = cmds[0][1]
    assert {k: env[k] for k in ("WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                "CUDA_VISIBLE_DEVICES")} == \
        {"WORLD_SIZE": "12", "LOCAL_SIZE": "4", "CROSS_RANK": "2", "CROSS_SIZE": "3", "MASTER_ADDR": "gpu1",
         "MASTER_PORT": "23456", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert cmds[0][0][2] == str(REPO / "launchers" / "finetune.py") and cmds[0][0][-2:] == ["--data", "d"]
    cpu = NodeLauncher("launchers/finetune.py", [], World(1, 0, 2, "127.0.0.1", 1), cpu=True).rank_commands()
    assert cpu[0][1]["DS_ACCELERATOR"] == "cpu" and cpu[0][1]["CUDA_VISIBLE_DEVICES"] == "0,1"


class Recorder:
    """Stands in for the SLURM commands a decision runs (scontrol requeue, scancel): records them."""

    def __init__(self, monkeypatch, lost: list[str] | None = None):
        self.calls: list[str] = []
        monkeypatch.setattr(launch, "scontrol_requeue", lambda: self.calls.append("requeue") or True)
        monkeypatch.setattr(launch, "fail_job", lambda: self.calls.append("fail"))
        monkeypatch.setattr(launch, "slurmd_port", lambda: 6818)
        monkeypatch.setattr(launch, "unreachable_hosts", lambda hosts, port: [h for h in hosts if h in (lost or [])])


def node_of(world: World, **kw) -> NodeLauncher:
    return NodeLauncher("launchers/finetune.py", [], world, requeue=lambda: launch.scontrol_requeue(), **kw)


@pytest.mark.parametrize("node,codes,restarts,env,want_code,want_calls", [
    (0, [0, 0], 0, {}, 0, []),                                          # done
    (0, [75, 75], 0, {}, 75, ["requeue"]),                              # stopped: node 0 requeues
    (1, [75, 75], 0, {}, 75, []),                                       # ... the others leave it to node 0
    (0, [75, 75], 3, {"PATCHREC_MAX_REQUEUES": "3"}, 75, []),           # requeue budget spent
    (0, [0, 1], 0, {}, 1, ["fail"]),                                    # a rank failed: end the job now
    (1, [-9, 75], 0, {}, 137, ["fail"]),                                # killed by a signal: 128 + 9
    (1, [1, 1], 0, {"PATCHREC_FAILURE_REQUEUES": "1"}, 1, ["requeue"]),  # failure requeues allowed
    (1, [1, 1], 1, {"PATCHREC_FAILURE_REQUEUES": "1"}, 1, ["fail"]),     # ... and spent
])
def test_what_the_job_does_when_the_ranks_end(monkeypatch, node, codes, restarts, env, want_code, want_calls):
    slurm_step_env(monkeypatch, node=node, nodes=2, restarts=restarts)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rec = Recorder(monkeypatch)
    got = node_of(World.from_env(2)).finish(codes)
    assert (got, rec.calls) == (want_code, want_calls)


def test_one_node_failure_is_left_to_srun_and_outside_slurm_nothing_is_requeued(monkeypatch):
    slurm_step_env(monkeypatch, node=0, nodes=1)
    rec = Recorder(monkeypatch)
    assert node_of(World.from_env(2)).finish([1, 0]) == 1 and rec.calls == []  # srun ends, the job fails
    monkeypatch.delenv("SLURM_JOB_ID")
    assert node_of(World(1, 0, 2, "127.0.0.1", 1)).finish([75, 75]) == RESUME_EXIT_CODE and rec.calls == []


def test_failure_message_names_the_lost_node(monkeypatch, capsys):
    slurm_step_env(monkeypatch, node=0, nodes=3)
    Recorder(monkeypatch, lost=["gpu3"])
    node_of(World.from_env(1)).finish([1])
    assert "lost node(s) gpu3 (slurmd does not answer)" in capsys.readouterr().err


def test_a_stopped_evaluation_is_run_again(monkeypatch):
    """Not resumable: a stop request terminates the ranks (SIGTERM); that counts as 'run me again'."""
    node = NodeLauncher("launchers/evaluate.py", [], World(1, 0, 2, "127.0.0.1", 1), resumable=False)
    assert node.stop_signal == signal.SIGTERM
    assert node.outcome([-signal.SIGTERM, -signal.SIGTERM]) == RESUME_EXIT_CODE
    assert node.outcome([1, -signal.SIGTERM]) == 1


def test_unreachable_hosts_probes_the_slurmd_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert launch.unreachable_hosts(["127.0.0.1"], port) == []
    assert launch.unreachable_hosts(["127.0.0.1"], port, timeout_s=1.0) == ["127.0.0.1"]  # nobody listens now


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([sys.executable, "-m", "patchrec_dist.launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


@pytest.mark.parametrize("args,message", [
    (["--nproc", "0", "launchers/finetune.py"], "--nproc must be at least 1"),
    (["--nproc", "1", "launchers/nope.py"], "script not found: launchers/nope.py"),
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "1", "launchers/finetune.py"], "--master-addr and --master-port"),
    (["--nproc", "1", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--master-port", "1",
      "launchers/finetune.py"], "--node-rank 2 is not in 0..1"),
])
def test_cli_refuses_bad_flags(args, message):
    out = run_cli(*args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_cli_runs_the_ranks_and_passes_their_exit_code_on(tmp_path):
    """Two ranks of a script that reports its environment and exits 75 (stopped at a checkpoint):
    outside SLURM the launcher exits 75 too ("run me again")."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys\n"
                      "print('R', os.environ['RANK'], os.environ['WORLD_SIZE'], sys.argv[1], flush=True)\n"
                      "sys.exit(75)\n")
    out = run_cli("--nproc", "2", "--cpu", str(script))
    assert out.returncode == RESUME_EXIT_CODE, out.stderr
    assert sorted(ln for ln in out.stdout.splitlines() if ln.startswith("R ")) == \
        ["R 0 2 --local_rank=0", "R 1 2 --local_rank=1"]
    assert "node 0: ranks exited: rank 0: 75, rank 1: 75" in out.stderr


def test_a_stale_extension_build_lock_is_named(tmp_path, capsys):
    """A DeepSpeed op build killed mid-way leaves torch's build lock, and every later start waits on it."""
    import os
    import time

    from patchrec_dist.train.distributed import warn_stale_build_locks

    live = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    dead = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    for path in (live, dead):
        path.parent.mkdir(parents=True)
        path.touch()
    old = time.time() - 3600
    os.utime(dead, (old, old))
    assert warn_stale_build_locks(str(tmp_path), max_age_s=900) == [str(dead)]
    err = capsys.readouterr().err
    assert str(dead) in err and str(live) not in err and "Remove it" in err
