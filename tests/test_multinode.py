"""Two SLURM nodes for real: `slurm/local_cluster.sh --nodes 2 --private-scratch --s3` makes each
node a network namespace (own address, hostname, slurmd) with its own /tmp and staging folder, so
the nodes share no scratch disk and data, runs and checkpoints travel through S3 (moto on the
bridge). One CPU rank per node, the tiny model, every wait bounded; our jobs are cancelled at the
end whatever happened.

Each scenario compares against a one-node, two-rank run of the same configuration on this host
(`deepspeed --num_gpus 2`): per-step train/loss within 1e-5."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from patchrec_dist.data.synthetic import generate_log, write_log
from patchrec_dist.monitor.tensorboard import read_scalars
from tests.distlaunch import launch
from tests.test_sharding_bounded import TABLE_COLS, _files
from tests.test_sharding_ray import EXTRA, SPEC
from tests.test_slurm import TERMINAL, bounded_wait, job_info, job_log, train_flags

pytestmark = [pytest.mark.multinode, pytest.mark.slurm, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
NODE_ROOT = Path("/var/lib/patchrec-cluster")
STEPS = 60  # about 4 s of training here: every signal below lands in the middle of a run


def cluster_cmd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """The 2-node cluster with private scratch and S3 (reconfigures whatever cluster of ours ran)."""
    run = cluster_cmd("--nodes", "2", "--private-scratch", "--s3")
    if run.returncode != 0:
        pytest.fail(f"local_cluster.sh --nodes 2 failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    endpoint = Path("/run/patchrec-cluster/s3_endpoint").read_text().strip()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "PATCHREC_S3_ENDPOINT": endpoint}
    yield {"endpoint": endpoint, "env": env}
    for node in ("node1", "node2"):  # a failed node test may have left one down
        status = cluster_cmd("status", timeout=60).stdout
        if re.search(rf"^{node}\s+\d+\s+\S+\s+(down|drain|unk)", status, re.M):
            cluster_cmd("start-node", node, timeout=120)


@pytest.fixture(scope="module")
def jobs(cluster):
    ids: list[str] = []
    yield ids
    for job in ids:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def root(request):
    """Logs and scratch that the host and both nodes see (/tmp is private to each node); kept when a
    test failed, for its job logs."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="patchrec-multinode-"))
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"job logs kept in {path}")


@pytest.fixture(scope="module")
def s3(cluster, learnable_dataset):
    """A bucket with the learnable data set in it."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": cluster["endpoint"]},
                           skip_instance_cache=True)
    bucket = f"multinode-{time.time_ns()}"
    fs.mkdir(bucket)
    fs.put(learnable_dataset.rstrip("/") + "/", f"{bucket}/ds/", recursive=True)
    return {"fs": fs, "bucket": bucket, "data": f"s3://{bucket}/ds", "url": lambda p: f"s3://{bucket}/{p}"}


@pytest.fixture(scope="module")
def reference(cluster, s3, root):
    """The one-node, two-rank run every multi-node fine-tuning run here must equal (started at once,
    in the background: it shares the two cores with the cluster's jobs)."""
    out = root / "reference"
    result: dict = {}
    flags = ["--data", s3["data"], "--output", str(out), "--model", "tiny", *train_flags(max_steps=STEPS)]
    thread = threading.Thread(daemon=True, target=lambda: result.update(run=launch(
        "launchers/finetune.py", flags, timeout=300, env=cluster["env"])))
    thread.start()

    def losses() -> dict[int, float]:
        thread.join(timeout=320)
        run = result.get("run")
        assert run is not None and run.returncode == 0, f"reference run failed:\n{run.tail() if run else 'hung'}"
        return dict(read_scalars(str(out / "tb"))["train/loss"])

    return losses


def job_env(cluster, **over: str) -> dict[str, str]:
    return {**os.environ, **cluster["env"], "PATCHREC_CPU": "1", "NPROC_PER_NODE": "1", "PYTHONUNBUFFERED": "1",
            **over}


def sbatch(script: str, logs: Path, env: dict[str, str], *opts: str) -> str:
    logs.mkdir(parents=True, exist_ok=True)
    sub = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--time=10", "--cpus-per-task=1",
                          f"--output={logs}/%x-%j.out", *opts, str(REPO / "slurm" / script)],
                         env=env, capture_output=True, text=True, timeout=60, cwd=logs)
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def s3_losses(s3, run: str, dest: Path) -> dict[int, float]:
    s3["fs"].get(f"{s3['bucket']}/{run}/tb/", str(dest) + "/", recursive=True)
    return dict(read_scalars(str(dest))["train/loss"])


def assert_equal_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1)), (sorted(got), sorted(want))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-5, (step, got[step], want[step])


def trained_past(job: str, logs: Path, step: int):
    def check() -> bool:
        state = job_info(job).get("JobState", "")
        if state in TERMINAL:
            raise AssertionError(f"job {job} ended ({state}) early:\n{job_log(logs, job)[-4000:]}")
        return any(int(s) > step for s in re.findall(r"^step (\d+)/", job_log(logs, job), re.M))
    return check


def wait_finished(job: str, timeout: float, restarts: str = "1") -> dict[str, str]:
    """Until the job ended after RESTARTS requeues (or ended for 5 s without them)."""
    ended: list[float] = []

    def finished() -> bool:
        info = job_info(job)
        if info.get("JobState") not in TERMINAL:
            ended.clear()
            return False
        ended.append(time.monotonic())
        return info.get("Restarts", "0") == restarts or ended[-1] - ended[0] > 5

    bounded_wait(finished, timeout, f"job {job} to end", interval=0.5)
    return job_info(job)


@pytest.mark.timeout(480)
def test_sbatch_on_two_nodes_stops_requeues_and_equals_one_node(cluster, s3, root, reference, jobs):
    """`sbatch --nodes=2 slurm/finetune.sh`, stopped with `scancel --signal=USR1 --batch` after step 3:
    every rank on both nodes saves (through S3: no shared disk), node 0's launcher requeues the job,
    and the requeued job resumes from that checkpoint; the per-step losses of the whole run equal the
    one-node, two-rank reference."""
    logs, run = root / "usr1", "runs/usr1"
    job = sbatch("finetune.sh", logs, job_env(cluster, DATA=s3["data"], OUTPUT=s3["url"](run),
                                              EXTRA_ARGS=" ".join(train_flags(max_steps=STEPS))))
    jobs.append(job)
    bounded_wait(trained_past(job, logs, 1), 200, "two training steps")
    assert subprocess.run(["scancel", "--signal=USR1", "--batch", job], timeout=30).returncode == 0
    info = wait_finished(job, 300)
    log = job_log(logs, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, log[-4000:])
    assert "node1" in log and "node2" in log and "ranks 1-1 of 2 started" in log, log[-4000:]
    saved = re.search(r"saving at step (\d+)", log)
    assert saved and f"scontrol requeue {job}" in log, log[-4000:]
    assert re.search(r"resumed at step (\d+)", log).group(1) == saved.group(1), log[-4000:]
    assert_equal_losses(s3_losses(s3, run, root / "usr1-tb"), reference())


@pytest.mark.timeout(600)
def test_a_dead_node_ends_the_job_within_60s_and_the_requeued_job_resumes(cluster, s3, root, reference, jobs):
    """Every process of node 2 (its slurmd and its rank) SIGKILLed in the middle of the run: node 1's
    launcher sees its rank fail at the next collective, names node 2 as lost (its slurmd does not
    answer) and requeues the job (PATCHREC_FAILURE_REQUEUES=1) well before SlurmdTimeout (300 s).
    Once node 2 is back, the job resumes from the last complete checkpoint and ends with the
    reference's losses."""
    logs, run = root / "dead", "runs/dead"
    job = sbatch("finetune.sh", logs, job_env(cluster, DATA=s3["data"], OUTPUT=s3["url"](run),
                                              EXTRA_ARGS=" ".join(train_flags(max_steps=STEPS, save_every=10)),
                                              PATCHREC_FAILURE_REQUEUES="1"))
    jobs.append(job)
    latest = f"{s3['bucket']}/{run}/checkpoints/latest"
    bounded_wait(lambda: s3["fs"].exists(latest) or trained_past(job, logs, STEPS)(), 200, "a committed checkpoint")
    killed = cluster_cmd("kill-node", "node2", timeout=60)
    assert killed.returncode == 0, killed.stderr
    t_kill = time.monotonic()
    try:
        bounded_wait(lambda: job_info(job).get("JobState") != "RUNNING", 60, "the job to leave RUNNING")
        left_after = time.monotonic() - t_kill
        log = job_log(logs, job)
        print(f"job {job} left RUNNING {left_after:.1f}s after node2 died ({job_info(job).get('JobState')})")
        assert "lost node(s) node2 (slurmd does not answer)" in log, log[-4000:]
        assert f"scontrol requeue {job}" in log, log[-4000:]
        trained = max(int(s) for s in re.findall(r"^step (\d+)/", log, re.M))
        assert trained < STEPS, f"the run had finished before node2 died ({trained} steps)"
        s3["fs"].invalidate_cache()
        committed = s3["fs"].cat(latest).decode().strip()  # the last complete checkpoint ...
    finally:
        back = cluster_cmd("start-node", "node2", timeout=120)
        assert back.returncode == 0, back.stderr
    info = wait_finished(job, 420)
    log = job_log(logs, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, log[-4000:])
    resumed = int(re.findall(r"resumed at step (\d+)", log)[-1])
    assert f"step_{resumed:08d}" == committed, (resumed, committed)  # ... is where the requeued job went on
    assert_equal_losses(s3_losses(s3, run, root / "dead-tb"), reference())


@pytest.mark.timeout(480)
def test_pipeline_sh_on_two_nodes_through_s3(cluster, s3, root, jobs):
    """`bash slurm/pipeline.sh` with every stage on both nodes and RUNS on S3: pretrain, finetune
    initialised from the S3 pretrain run, evaluation of the S3 run on 2 ranks on 2 nodes; submitted
    again, it finds every stage finished on S3 and submits nothing."""
    runs, logs = s3["url"]("pipe"), root / "pipe"
    logs.mkdir()
    short = train_flags(max_steps=4, save_every=0, export="true")
    env = job_env(cluster, DATA=s3["data"], RUNS=runs, SBATCH_ARGS="--nodes=2 --time=10 --cpus-per-task=1",
                  PRETRAIN_ARGS=" ".join(short), FINETUNE_ARGS=" ".join(short),
                  EVAL_ARGS="--max-examples 8 --beams 4 --top-k 4 --batch-size 4")
    out = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh")], cwd=logs, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ids = re.findall(r"job (\d+)", out.stdout)
    assert len(ids) == 3, out.stdout
    jobs.extend(ids)
    bounded_wait(lambda: job_info(ids[-1]).get("JobState") in TERMINAL, 420, "the evaluation job to end")
    text = "\n".join(job_log(logs / "logs", j) for j in ids)
    assert [job_info(j).get("JobState") for j in ids] == ["COMPLETED"] * 3, text[-4000:]
    fs, bucket = s3["fs"], s3["bucket"]
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{bucket}/pipe/finetune/config.json"))["init"] == f"{runs}/pretrain"
    metrics = json.loads(fs.cat(f"{bucket}/pipe/finetune/eval-test/metrics.json"))
    assert metrics["examples"] == 8 and metrics["ranks"] == 2, metrics
    assert "ranks 1-1 of 2 started" in job_log(logs / "logs", ids[-1])
    again = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh")], cwd=logs, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "job " not in again.stdout and again.stdout.count("finished already") == 3, \
        again.stdout + again.stderr


@pytest.mark.timeout(600)
def test_submitit_pipeline_on_two_nodes_preempted_resumes_exactly(cluster, s3, root, jobs):
    """`python launchers/submit.py --cluster slurm --slurm nodes=2`: each stage is one submitit job
    over both nodes. The pre-training stage is interrupted twice the way submitit emulates it:
    `job._interrupt(timeout=True)` (USR2 alone, the time-limit signal), then `job._interrupt()` (a
    preemption: TERM, then USR2, to every process of the job). Each time the ranks on both nodes
    save, submitit's handler in task 0 requeues once they exited, and the requeued stage resumes;
    the chain goes on to fine-tuning and evaluation. Pre-training's losses equal a one-node,
    two-rank run of the same flags."""
    import submitit

    runs, folder = s3["url"]("sub"), root / "submitit"
    pre_flags = train_flags(max_steps=STEPS, save_every=0, export="true")
    ref_out, ref = root / "sub-ref", {}
    reference = threading.Thread(daemon=True, target=lambda: ref.update(run=launch(
        "launchers/pretrain.py", ["--data", s3["data"], "--output", str(ref_out), *pre_flags],
        timeout=300, env=cluster["env"])))
    reference.start()
    cmd = [sys.executable, str(REPO / "launchers" / "submit.py"), "--cluster", "slurm", "--cpu", "--nproc", "1",
           "--data", s3["data"], "--runs", runs, "--logs", str(folder),
           "--slurm", "nodes=2,cpus_per_task=1,timeout_min=60",
           "--pretrain-args", " ".join(pre_flags),
           "--finetune-args", " ".join(train_flags(max_steps=3, save_every=0, export="true")),
           "--eval-args", "--max-examples 8 --beams 4 --top-k 4 --batch-size 4"]
    sub = subprocess.run(cmd, env=job_env(cluster), capture_output=True, text=True, timeout=120, cwd=root)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    ids = dict(re.findall(r"^(\w+): job (\d+)$", sub.stdout, re.M))
    assert list(ids) == ["pretrain", "finetune", "evaluate"], sub.stdout
    jobs.extend(ids.values())
    pre = ids["pretrain"]

    def log(job: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(folder.glob(f"{job}_*_log.*")))

    def past(step: int):
        def check() -> bool:
            if job_info(pre).get("JobState") in TERMINAL:
                raise AssertionError(f"pretrain job ended early:\n{log(pre)[-4000:]}")
            return any(int(s) > step for s in re.findall(rf"^step (\d+)/{STEPS} ", log(pre), re.M))
        return check

    job = submitit.SlurmJob(folder, pre)
    bounded_wait(past(1), 240, "two pre-training steps")
    job._interrupt(timeout=True)  # USR2 alone: what SLURM sends signal_delay_s before the time limit
    bounded_wait(lambda: len(re.findall(r"resumed at step \d+", log(pre))) == 1, 180, "the first resume")
    first = int(re.search(r"resumed at step (\d+)", log(pre)).group(1))
    bounded_wait(past(first + 1), 180, "two steps after the first resume")
    job._interrupt()  # a preemption: TERM, then USR2
    bounded_wait(lambda: job_info(ids["evaluate"]).get("JobState") in TERMINAL, 480, "the evaluation job to end")
    text = log(pre)
    states = {name: job_info(j).get("JobState") for name, j in ids.items()}
    assert states == dict.fromkeys(ids, "COMPLETED"), (states, text[-4000:], log(ids["evaluate"])[-3000:])
    assert job_info(pre).get("Restarts") == "2", text[-4000:]
    assert text.count("every rank exited after") == 2 and text.count("node 1: ranks exited: rank 1: 75") == 2, \
        text[-4000:]
    saved = re.findall(r"saving at step (\d+)", text)
    assert len(saved) == 2 and re.findall(r"resumed at step (\d+)", text) == saved, text[-4000:]
    metrics = json.loads(s3["fs"].cat(f"{s3['bucket']}/sub/finetune/eval-test/metrics.json"))
    assert metrics["examples"] == 8 and metrics["ranks"] == 2, metrics
    reference.join(timeout=300)
    assert ref.get("run") is not None and ref["run"].returncode == 0, ref.get("run") and ref["run"].tail()
    assert_equal_losses(s3_losses(s3, "sub/pretrain", root / "sub-tb"),
                        dict(read_scalars(str(ref_out / "tb"))["train/loss"]))


def node_examples(output_url: str) -> dict[tuple[int, int], list]:
    """(rank, step) -> examples, from `--log-examples` files in every node's private staging folder
    (a remote output keeps them in the local work folder); the last record of a step wins."""
    digest = hashlib.sha256(output_url.encode()).hexdigest()[:16]
    out = {}
    for path in sorted(NODE_ROOT.glob(f"node*/staging/{digest}/examples/rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[(int(path.stem[4:]), rec["step"])] = rec["examples"]
    return out


@pytest.mark.timeout(420)
def test_two_node_run_resumed_on_one_node_with_universal(cluster, s3, root, jobs):
    """Elastic: a 2-node run stopped at a checkpoint (not requeued: PATCHREC_MAX_REQUEUES=0) continues
    as a 1-node, 1-rank job with --universal: every example of the epoch's remaining steps is new, and
    none is lost (each step still trains on the same global batch)."""
    logs, run = root / "elastic", "runs/elastic"
    url, steps = s3["url"](run), 40
    flags = train_flags(max_steps=steps, save_every=0, log_examples="true")
    job = sbatch("finetune.sh", logs, job_env(cluster, DATA=s3["data"], OUTPUT=url, EXTRA_ARGS=" ".join(flags),
                                              PATCHREC_MAX_REQUEUES="0"))
    jobs.append(job)
    bounded_wait(trained_past(job, logs, 1), 200, "two training steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], timeout=30)
    info = wait_finished(job, 120, restarts="0")
    log = job_log(logs, job)
    assert info.get("ExitCode") == "75:0" and "not requeued" in log, (info, log[-4000:])
    stopped = int(re.search(r"saving at step (\d+)", log).group(1))
    one = sbatch("finetune.sh", logs, job_env(cluster, DATA=s3["data"], OUTPUT=url,
                                              EXTRA_ARGS=" ".join([*flags, "--universal", "true"])), "--nodes=1")
    jobs.append(one)
    info = wait_finished(one, 240, restarts="0")
    assert info.get("JobState") == "COMPLETED", (info, job_log(logs, one)[-4000:])
    assert f"resumed at step {stopped}" in job_log(logs, one)
    seen = node_examples(url)
    before = [tuple(e) for (_, step), bs in seen.items() if step <= stopped for b in bs for e in b]
    after = [tuple(e) for (_, step), bs in seen.items() if step > stopped for b in bs for e in b]
    assert {r for r, s in seen if s <= stopped} == {0, 1} and {r for r, s in seen if s > stopped} == {0}
    assert len(after) == len(set(after)) == (steps - stopped) * 4, (len(after), stopped)  # 1 rank x 4 a step
    assert not set(before) & set(after)


def ray_processes(node: str) -> list[str]:
    """Ray's processes still running on NODE (those in its network namespace): pid and command line."""
    want = os.stat(f"/run/netns/patchrec-{node}").st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino != want:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if re.search(r"\bray\b|raylet|gcs_server|ray::|default_worker", cmd):
            found.append(f"{pid} {cmd[:200]}")
    return found


@pytest.fixture(scope="module")
def shard_args(s3, root) -> list[str]:
    """The flags of tools/shard_histories.py for a small synthetic Parquet log on the cluster's S3 (24,000
    interactions: 3 input chunks, 4 buckets, several byte-sized shards), --output left out."""
    paths = write_log(*generate_log(SPEC), root / "shard-raw", "parquet")
    inp = {k: s3["url"](f"shard-in/{Path(p).name}") for k, p in paths.items()}
    for k, p in paths.items():
        s3["fs"].put_file(p, inp[k])
    return ["--format", "table", "--input", inp["interactions"], "--items", inp["items"], *TABLE_COLS, *EXTRA]


def s3_files(s3, url: str) -> list[str]:
    s3["fs"].invalidate_cache()
    try:
        return sorted(s3["fs"].find(url.removeprefix("s3://")))
    except FileNotFoundError:
        return []


@pytest.mark.timeout(300)
def test_shard_sh_runs_the_ray_engine_on_two_nodes_like_the_local_engine(cluster, s3, root, jobs, shard_args):
    """`sbatch --nodes=2 slurm/shard.sh`: a Ray head on node 1 and a Ray worker on node 2 (`ray start
    --block` in srun steps, each node advertising its own bridge address), the driver on node 1
    (`--engine ray`), input and output on S3 (moto on the bridge; the nodes share no disk). The job
    exits 0 with tasks run on both nodes, writes the bytes `--engine local` writes from the same
    input, leaves no staging files, and stops Ray on both nodes before it ends."""
    args = shard_args
    # the reference: --engine local on this host, same input (from S3), written locally
    local = subprocess.run([sys.executable, str(REPO / "tools" / "shard_histories.py"), *args, "--output",
                            str(root / "shard-local")], env={**os.environ, **cluster["env"], "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr[-3000:]
    want = _files(root / "shard-local")
    assert sum(k.endswith(".tar") for k in want) > 2

    logs, out = root / "shard", s3["url"]("shard-ray")
    job = sbatch("shard.sh", logs, job_env(cluster, SHARD_ARGS=" ".join([*args, "--output", out])))
    jobs.append(job)
    info = wait_finished(job, 240, restarts="0")
    log = job_log(logs, job)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, log[-4000:])
    assert "Ray: 2 node(s) joined at 10.77.0.11:6379: 10.77.0.11 10.77.0.12" in log, log[-4000:]
    assert re.search(r"Ray tasks on 2 node\(s\)", log), log[-4000:]  # the tool's own count: both nodes ran tasks
    assert "shard_histories.py exited with 0" in log and "Ray stopped on every node" in log, log[-4000:]
    for node in ("node1", "node2"):
        assert ray_processes(node) == [], (node, ray_processes(node))

    found = s3_files(s3, out)
    assert not [p for p in found if "_staging-" in p], found
    s3["fs"].get(out.removeprefix("s3://") + "/", str(root / "shard-ray") + "/", recursive=True)
    got = _files(root / "shard-ray")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], name


@pytest.mark.timeout(240)
def test_shard_sh_ends_with_the_tools_exit_status_and_stops_ray(cluster, s3, root, jobs):
    """A run the tool refuses (its input does not exist: exit status 2) is the job's status, and Ray is
    stopped on both nodes all the same."""
    logs = root / "shard-bad"
    args = ["--format", "table", "--input", s3["url"]("shard-in/missing.parquet"), "--items",
            s3["url"]("shard-in/missing-items.parquet"), *TABLE_COLS, "--output", s3["url"]("shard-bad")]
    job = sbatch("shard.sh", logs, job_env(cluster, SHARD_ARGS=" ".join(args)))
    jobs.append(job)
    info = wait_finished(job, 180, restarts="0")
    log = job_log(logs, job)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, log[-4000:])
    assert "shard_histories: error:" in log and "missing.parquet" in log, log[-4000:]
    assert "shard_histories.py exited with 2" in log and "Ray stopped on every node" in log, log[-4000:]
    for node in ("node1", "node2"):
        assert ray_processes(node) == [], (node, ray_processes(node))


@pytest.mark.timeout(240)
def test_shard_sh_stopped_by_scancel_leaves_nothing_on_s3_and_stops_ray(cluster, s3, root, jobs, shard_args):
    """`scancel --batch --signal=TERM` once the tool has written staging files to S3: the batch shell
    passes it to the tool as SIGINT, the tool stops and removes what it wrote, the job ends with the
    tool's status (130), and Ray is stopped on both nodes."""
    logs, out = root / "shard-stop", s3["url"]("shard-stop")
    job = sbatch("shard.sh", logs, job_env(cluster, SHARD_ARGS=" ".join([*shard_args, "--output", out])))
    jobs.append(job)

    def staging_written() -> bool:
        if job_info(job).get("JobState") in TERMINAL:
            raise AssertionError(f"job {job} ended early:\n{job_log(logs, job)[-4000:]}")
        return any("_staging-" in p for p in s3_files(s3, out))

    bounded_wait(staging_written, 120, "the tool's first staging files on S3")
    assert subprocess.run(["scancel", "--batch", "--signal=TERM", job], timeout=30).returncode == 0
    info = wait_finished(job, 120, restarts="0")
    log = job_log(logs, job)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "130:0", (info, log[-4000:])
    assert "batch shell got SIGTERM" in log and "KeyboardInterrupt" in log, log[-4000:]
    assert "shard_histories.py exited with 130" in log and "Ray stopped on every node" in log, log[-4000:]
    assert s3_files(s3, out) == []
    for node in ("node1", "node2"):
        assert ray_processes(node) == [], (node, ray_processes(node))
