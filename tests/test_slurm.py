"""The sbatch scripts on a real single-node SLURM cluster (slurm/local_cluster.sh starts one when
`sinfo` does not answer): a fine-tuning job runs to the end; a pre-training job stopped with
SIGUSR1 saves, requeues itself and finishes with exactly the losses of an uninterrupted run.

CPU ranks (PATCHREC_CPU=1), the tiny model; every wait is bounded and our jobs are cancelled at
the end whatever happened."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from patchrec_dist.monitor.tensorboard import read_scalars
from tests.distlaunch import launch

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def jobs(slurm_cluster):
    """Ids of the jobs this module submitted; whatever is left of them is cancelled at the end."""
    ids: list[str] = []
    yield ids
    for job in ids:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def train_flags(**over) -> list[str]:
    base = {"max-steps": 6, "micro-batch": 4, "lr": 3e-3, "warmup-ratio": 0.1, "num-workers": 1, "group-size": 2,
            "save-every": 2, "dist-timeout-s": 60, "export": "false", "seed": 3}
    base.update({k.replace("_", "-"): v for k, v in over.items()})
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def job_env(data: str, out: Path, flags: list[str]) -> dict[str, str]:
    return {**os.environ, "PATCHREC_CPU": "1", "DATA": data, "OUTPUT": str(out), "EXTRA_ARGS": " ".join(flags),
            "PYTHONUNBUFFERED": "1"}


def sbatch_cmd(script: str, log_dir: Path, *opts: str) -> list[str]:
    return ["sbatch", *opts, "--parsable", "--time=10", "--cpus-per-task=1", f"--output={log_dir}/%x-%j.out",
            str(REPO / "slurm" / script)]


def job_info(job: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (this cluster keeps no accounting: no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def job_log(log_dir: Path, job: str) -> str:
    logs = list(log_dir.glob(f"*-{job}.out"))
    return logs[0].read_text(errors="replace") if logs else "(no log)"


def bounded_wait(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")


PRETRAIN_STEPS = 40


@pytest.fixture(scope="module")
def runs(learnable_dataset, jobs, tmp_path_factory):
    """Everything starts at once, so that the waits overlap on this 2-core machine (each job asks for
    1 CPU: both fit on the node): the fine-tuning job (`sbatch --wait`), the pre-training job, the
    latter's uninterrupted reference (a direct deepspeed launch with the same flags), and a watcher
    that sends `scancel --signal=USR1 --batch` once the pre-training job has its first checkpoint."""
    root = tmp_path_factory.mktemp("slurm")
    logs = root / "logs"
    logs.mkdir()
    r = {"logs": logs, "t0": time.monotonic(), "ft_out": root / "ft", "pt_out": root / "pt", "ref_out": root / "ref"}
    ft_flags = train_flags(max_steps=6)
    pt_flags = train_flags(max_steps=PRETRAIN_STEPS, save_every=2)

    r["ft_proc"] = subprocess.Popen(sbatch_cmd("finetune.sh", logs, "--wait"), cwd=root,
                                    env=job_env(learnable_dataset, r["ft_out"], ft_flags),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r["ft_job"] = r["ft_proc"].stdout.readline().strip().split(";")[0]  # --parsable: the id comes first
    assert r["ft_job"], f"sbatch failed: {r['ft_proc'].communicate(timeout=30)}"
    jobs.append(r["ft_job"])
    sub = subprocess.run(sbatch_cmd("pretrain.sh", logs), cwd=root, env=job_env(learnable_dataset, r["pt_out"], pt_flags),
                         capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    r["pt_job"] = sub.stdout.strip().split(";")[0]
    jobs.append(r["pt_job"])

    def reference() -> None:
        r["ref"] = launch("launchers/pretrain.py", ["--data", learnable_dataset, "--output", str(r["ref_out"]),
                                                    "--model", "tiny", *pt_flags],
                          timeout=230, while_running=lambda proc: r.update(ref_proc=proc))

    def watcher() -> None:  # USR1 to the batch shell right after the first checkpoint
        job, latest = r["pt_job"], r["pt_out"] / "checkpoints" / "latest"
        try:
            deadline = time.monotonic() + 180
            while not latest.exists():
                state = job_info(job).get("JobState", "")
                if state in TERMINAL or time.monotonic() > deadline:
                    r["watch"] = f"no checkpoint: job {state}, {time.monotonic() - r['t0']:.0f}s"
                    return
                time.sleep(0.1)
            sig = subprocess.run(["scancel", "--signal=USR1", "--batch", job], capture_output=True, text=True,
                                 timeout=30)
            r["watch"] = "signalled" if sig.returncode == 0 else f"scancel failed: {sig.stderr}"
            r["t_signal"] = time.monotonic() - r["t0"]
        except Exception as exc:  # noqa: BLE001 - reported by the test
            r["watch"] = f"watcher failed: {exc!r}"

    r["threads"] = [threading.Thread(target=f, daemon=True) for f in (reference, watcher)]
    for t in r["threads"]:
        t.start()
    yield r
    if r["ft_proc"].poll() is None:
        r["ft_proc"].kill()
    if "ref_proc" in r and r["threads"][0].is_alive():  # a failure: stop the reference run too
        try:
            os.killpg(r["ref_proc"].pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_finetune_job_runs_to_the_end(runs):
    proc = runs["ft_proc"]
    try:
        _, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    job = runs["ft_job"]
    print(f"finetune job {job}: done at {time.monotonic() - runs['t0']:.0f}s")
    log = job_log(runs["logs"], job)
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode}\n{stderr}\n{log[-4000:]}"
    out = runs["ft_out"]
    assert json.loads((out / "DONE.json").read_text()) == {"step": 6, "total_steps": 6}
    assert list((out / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert sorted(s for s, _ in read_scalars(str(out / "tb"))["train/loss"]) == list(range(1, 7))
    assert "training exited with 0" in log and "launchers/finetune.py" in log


def test_usr1_saves_requeues_and_resumes_exactly(runs):
    job, logs, out, t0 = runs["pt_job"], runs["logs"], runs["pt_out"], runs["t0"]
    reference_thread, watcher_thread = runs["threads"]
    watcher_thread.join(timeout=200)
    assert runs.get("watch") == "signalled", f"{runs.get('watch')}\n{job_log(logs, job)[-4000:]}"
    states: list[str] = []
    ended_without_restart: list[float] = []

    def finished() -> bool:  # ended after its requeue (or ended for 5 s without one: then fail below)
        info = job_info(job)
        state = info.get("JobState", "?")
        if not states or states[-1] != state:
            states.append(state)
        if state not in TERMINAL:
            ended_without_restart.clear()
            return False
        if info.get("Restarts", "0") != "0":
            return True
        ended_without_restart.append(time.monotonic())
        return ended_without_restart[-1] - ended_without_restart[0] > 5

    bounded_wait(finished, max(10.0, 225 - (time.monotonic() - t0)), "the requeued job to finish", interval=0.5)
    info, log = job_info(job), job_log(logs, job)
    print(f"pretrain job {job}: USR1 at {runs['t_signal']:.0f}s, done at {time.monotonic() - t0:.0f}s; "
          f"states seen {states}")
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, log[-4000:])
    assert info.get("Restarts") == "1", (info, log[-4000:])  # requeued exactly once
    assert "batch shell got SIGUSR1" in log, log[-4000:]
    assert f"scontrol requeue {job}" in log and "(restart 1)" in log, log[-4000:]
    resumed = re.search(r"resumed at step (\d+)", log)
    assert resumed and 2 <= int(resumed.group(1)) < PRETRAIN_STEPS, log[-4000:]
    assert json.loads((out / "DONE.json").read_text()) == {"step": PRETRAIN_STEPS, "total_steps": PRETRAIN_STEPS}

    reference_thread.join(timeout=max(1.0, 235 - (time.monotonic() - t0)))
    assert not reference_thread.is_alive(), "the reference run did not finish"
    ref = runs["ref"]
    assert ref.returncode == 0, f"reference run failed ({ref.returncode}):\n{ref.tail()}"
    a = dict(read_scalars(str(runs["ref_out"] / "tb"))["train/loss"])
    b = dict(read_scalars(str(out / "tb"))["train/loss"])
    assert sorted(a) == sorted(b) == list(range(1, PRETRAIN_STEPS + 1)), (sorted(a), sorted(b))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_pipeline_chains_the_three_stages_skips_finished_ones_then_recommends(learnable_dataset, jobs, tmp_path):
    """`bash slurm/pipeline.sh`: pretrain -> finetune (initialised from pretrain) -> evaluate, chained
    with afterok; submitted again, it finds every stage finished and submits nothing."""
    runs = tmp_path / "runs"
    env = {**os.environ, "PATCHREC_CPU": "1", "DATA": learnable_dataset, "RUNS": str(runs), "PYTHONUNBUFFERED": "1",
           "SBATCH_ARGS": "--time=10 --cpus-per-task=1",
           "PRETRAIN_ARGS": " ".join(train_flags(max_steps=4, save_every=0)),
           "FINETUNE_ARGS": " ".join(train_flags(max_steps=4, save_every=0, export="true")),
           "EVAL_ARGS": "--max-examples 8 --beams 4 --top-k 4 --batch-size 4"}
    env["PRETRAIN_ARGS"] = env["PRETRAIN_ARGS"].replace("--export false", "--export true")
    out = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ids = re.findall(r"job (\d+)", out.stdout)
    assert len(ids) == 3, out.stdout
    jobs.extend(ids)
    assert f"tensorboard --logdir {runs}" in out.stdout
    bounded_wait(lambda: job_info(ids[-1]).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                 420, "the evaluation job to end")
    logs = "\n".join(job_log(tmp_path / "logs", j) for j in ids)
    assert [job_info(j).get("JobState") for j in ids] == ["COMPLETED"] * 3, logs[-4000:]
    assert json.loads((runs / "finetune" / "config.json").read_text())["init"] == str(runs / "pretrain")
    metrics = json.loads((runs / "finetune" / "eval-test" / "metrics.json").read_text())
    assert metrics["examples"] == 8 and metrics["ranks"] == 2
    for stage in ("pretrain", "finetune"):
        assert len(read_scalars(str(runs / stage / "tb"))["train/loss"]) == 4
    again = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "job " not in again.stdout and again.stdout.count("finished already") == 3

    # then `sbatch slurm/recommend.sh` on the fine-tuned run: every user, over the job's 2 ranks, into
    # RUN/recommendations (its default), through the same per-node launch path
    rec_env = {**os.environ, "PATCHREC_CPU": "1", "RUN": str(runs / "finetune"), "PYTHONUNBUFFERED": "1",
               "REC_ARGS": "--top-k 3 --beams 4 --batch-size 16"}
    rec = subprocess.run(sbatch_cmd("recommend.sh", tmp_path / "logs", "--wait"), cwd=tmp_path, env=rec_env,
                         capture_output=True, text=True, timeout=240)
    job = rec.stdout.strip().split(";")[0]
    jobs.append(job)
    assert rec.returncode == 0, job_log(tmp_path / "logs", job)[-4000:]
    summary = json.loads((runs / "finetune" / "recommendations" / "recommendations.json").read_text())
    assert summary["users"] == 48 and summary["rows"] == 3 * 48 and summary["ranks"] == 2
    assert summary["run"] == str(runs / "finetune") and summary["data"] == learnable_dataset


def test_term_to_the_steps_saves_requeues_and_resumes(learnable_dataset, jobs, tmp_path):
    """`scancel --signal=TERM JOBID` (TERM to every process of the job's steps, what a preemption and
    submitit's `_interrupt` send): the ranks save and exit 75 (the per-node launcher only forwards TERM, where
    DeepSpeed's launcher would kill them 30 s later), and the job requeues itself and resumes from that
    checkpoint."""
    logs, out, steps = tmp_path / "logs", tmp_path / "pt", 30
    logs.mkdir()
    sub = subprocess.run(sbatch_cmd("pretrain.sh", logs), cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=job_env(learnable_dataset, out, train_flags(max_steps=steps, save_every=0)))
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    jobs.append(job)

    def training() -> bool:
        if job_info(job).get("JobState") in TERMINAL:
            raise AssertionError(f"job {job} ended before the signal:\n{job_log(logs, job)[-4000:]}")
        return re.search(r"^step 3/", job_log(logs, job), re.M) is not None

    bounded_wait(training, 180, "three training steps")
    assert subprocess.run(["scancel", "--signal=TERM", job], capture_output=True, timeout=30).returncode == 0
    ended: list[float] = []

    def finished() -> bool:  # ended after its requeue (or ended for 5 s without one: then fail below)
        info = job_info(job)
        if info.get("JobState") not in TERMINAL:
            ended.clear()
            return False
        ended.append(time.monotonic())
        return info.get("Restarts", "0") != "0" or ended[-1] - ended[0] > 5

    bounded_wait(finished, 180, "the requeued job to end", interval=0.5)
    info, log = job_info(job), job_log(logs, job)
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", (info, log[-4000:])
    # SLURM's TERM reaches the ranks, and the launcher forwards it as USR1: either may come first
    saved = re.search(r"stop requested \(signal \[[\d, ]*\b15\b[\d, ]*\]\): saving at step (\d+)", log)
    assert saved and "node 0: ranks exited: rank 0: 75, rank 1: 75" in log and f"scontrol requeue {job}" in log, \
        log[-4000:]
    assert re.search(r"resumed at step (\d+)", log).group(1) == saved.group(1), log[-4000:]
    assert json.loads((out / "DONE.json").read_text()) == {"step": steps, "total_steps": steps}
