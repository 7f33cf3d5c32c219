"""DeepSpeed ZeRO-3 training on 2 CPU ranks: learning, exact resume after signals, S3 checkpoints,
LoRA, export, failures. Each launch has a hard time limit and is killed as a group."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from patchrec_dist.monitor.tensorboard import read_scalars
from patchrec_dist.train.signals import RESUME_EXIT_CODE
from tests.conftest import REPO
from tests.distlaunch import launch, rank_processes, wait_for

pytestmark = pytest.mark.multiproc

FINETUNE = "launchers/finetune.py"


def flags(data: str, out: str | Path, **over) -> list[str]:
    base = {"data": data, "output": str(out), "max-steps": 10, "micro-batch": 4, "lr": 3e-3, "warmup-ratio": 0.1,
            "num-workers": 1, "group-size": 2, "save-every": 2, "dist-timeout-s": 60, "log-examples": "true",
            "export": "false", "seed": 3}
    base.update({k.replace("_", "-"): v for k, v in over.items()})
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def losses(run: str | Path) -> dict[int, float]:
    return dict(read_scalars(str(Path(run) / "tb"))["train/loss"])


def examples(run: str | Path) -> dict[tuple[int, int], list]:
    """(rank, step) -> the examples trained on (the last record wins: a resumed step replaces one)."""
    out = {}
    for path in sorted((Path(run) / "examples").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[(rank, rec["step"])] = rec["examples"]
    return out


def ok(run, what: str) -> None:
    assert run.returncode == 0, f"{what} failed ({run.returncode}):\n{run.tail()}"


@pytest.fixture(scope="module")
def reference(learnable_dataset, tmp_path_factory) -> Path:
    """Run A: 10 uninterrupted steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(launch(FINETUNE, flags(learnable_dataset, out)), "reference run")
    return out


def assert_same_as_reference(run: Path, reference: Path) -> None:
    a, b = losses(reference), losses(run)
    assert sorted(b) == sorted(a) == list(range(1, 11))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    assert examples(run) == examples(reference)


def interrupt_after_first_checkpoint(out: Path, sig: int):
    def poke(proc):  # one rank only: all must agree
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), 150, "the first checkpoint")
        rank_processes(proc, "finetune.py")[1].send_signal(sig)
    return poke


def test_loss_falls_and_run_is_complete(learnable_dataset, tmp_path):
    out = tmp_path / "run"
    run = launch(FINETUNE, flags(learnable_dataset, out, max_steps=40, save_every=0, export="true", lr=5e-3,
                                 eval_every=20, eval_batches=2))
    ok(run, "training")
    curve = losses(out)
    first, last = sum(curve[s] for s in range(1, 4)) / 3, sum(curve[s] for s in range(36, 41)) / 5
    assert last < 0.6 * first, (first, last)
    done = json.loads((out / "DONE.json").read_text())
    assert done == {"step": 40, "total_steps": 40}
    scalars = read_scalars(str(out / "tb"))
    for name in ("train/lr", "train/grad_norm", "train/examples_per_s", "train/positions_per_s",
                 "train/compression", "train/patch_fraction", "train/data_wait_frac", "sys/mem_gb"):
        assert len(scalars[name]) == 40, name
    assert all(0 < v < 1 for _, v in scalars["train/compression"])  # pft-s feeds fewer positions than text
    val = dict(scalars["val/loss"])
    assert sorted(val) == [20, 40] and val[40] < val[20]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert "<|patch_id|>" in tok.get_vocab() and model.config.vocab_size == len(tok)


def test_exact_resume_after_sigusr1_to_one_rank(learnable_dataset, reference, tmp_path):
    out = tmp_path / "run"
    first = launch(FINETUNE, flags(learnable_dataset, out),
                   while_running=interrupt_after_first_checkpoint(out, signal.SIGUSR1))
    assert first.returncode == RESUME_EXIT_CODE, first.tail()
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < 10
    resumed = launch(FINETUNE, flags(learnable_dataset, out, resume="auto"))
    ok(resumed, "resume")
    assert f"resumed at step {stopped_at}" in resumed.output
    assert_same_as_reference(out, reference)


def test_sigterm_to_the_launcher_saves_at_the_signal_exits_75_then_resumes(learnable_dataset, reference, tmp_path):
    """TERM to the per-node launcher (the SLURM scripts' and submitit's): it asks its ranks to stop,
    they agree, save at the next step boundary and exit 75, and the launcher exits 75. (DeepSpeed's own launcher exits 1 after a TERM whatever its ranks do: its
    handler kills them and calls sys.exit(1), so "resume me" cannot be read from it.)"""
    out = tmp_path / "run"

    def poke(proc):
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), 150, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)

    first = launch(FINETUNE, flags(learnable_dataset, out), while_running=poke, launcher="patchrec")
    assert first.returncode == RESUME_EXIT_CODE, first.tail()
    saved = re.search(r"stop requested \(signal \[[\d, ]+\]\): saving at step (\d+)", first.output)
    assert saved, first.tail()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / latest / "state.json").read_text())
    # the checkpoint is the one written on the signal, after the periodic one at step 2 that was awaited
    assert state["step"] == int(saved.group(1)) and 3 <= state["step"] < 10, (state["step"], saved.group(0))
    ok(launch(FINETUNE, flags(learnable_dataset, out)), "resume")
    assert_same_as_reference(out, reference)


@pytest.mark.s3
def test_checkpoints_on_s3_and_resume_from_a_fresh_machine(learnable_dataset, reference, tmp_path, s3_env):
    url = f"s3://{s3_env['bucket']}/run"
    env = {k: str(v) for k, v in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "PATCHREC_S3_ENDPOINT": s3_env["endpoint"], "PATCHREC_STAGING": tmp_path / "staging-a"}.items()}

    def poke(proc):
        wait_for(lambda: s3_env["fs"].exists(f"{s3_env['bucket']}/run/checkpoints/latest"), 150, "a checkpoint on S3")
        rank_processes(proc, "finetune.py")[0].send_signal(signal.SIGUSR1)

    first = launch(FINETUNE, flags(learnable_dataset, url), env=env, while_running=poke)
    assert first.returncode == RESUME_EXIT_CODE, first.tail()
    env["PATCHREC_STAGING"] = str(tmp_path / "staging-b")  # nothing local survives: a new node
    ok(launch(FINETUNE, flags(learnable_dataset, url), env=env), "resume from S3")
    local = tmp_path / "downloaded"
    s3_env["fs"].get(f"{s3_env['bucket']}/run/tb", str(local / "tb"), recursive=True)
    a = losses(reference)
    b = losses(local)
    assert sorted(b) == list(range(1, 11)) and all(abs(a[s] - b[s]) <= 1e-5 for s in a)
    assert s3_env["fs"].exists(f"{s3_env['bucket']}/run/DONE.json")


def test_killed_rank_fails_the_job_quickly(learnable_dataset, tmp_path):
    out = tmp_path / "run"
    killed_at = []

    def kill_one(proc):
        wait_for(lambda: (out / "examples" / "rank0.jsonl").exists(), 150, "the first step")
        rank_processes(proc, "finetune.py")[1].send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())

    run = launch(FINETUNE, flags(learnable_dataset, out, max_steps=200), while_running=kill_one, timeout=240)
    ended = time.monotonic()
    assert run.returncode not in (0, None, RESUME_EXIT_CODE), run.tail()
    assert ended - killed_at[0] < 60, f"the job took {ended - killed_at[0]:.0f}s to fail after a rank died"
    assert not (out / "DONE.json").exists()


def test_lora_trains_resumes_and_exports(learnable_dataset, tmp_path):
    out = tmp_path / "run"
    lora = {"lora": "true", "lora_rank": 4, "lora_targets": "q_proj,v_proj", "max_steps": 6}
    first = launch(FINETUNE, flags(learnable_dataset, out, **lora),
                   while_running=interrupt_after_first_checkpoint(out, signal.SIGUSR1))
    assert first.returncode == RESUME_EXIT_CODE, first.tail()
    ok(launch(FINETUNE, flags(learnable_dataset, out, export="true", **lora)), "LoRA resume")
    assert sorted(losses(out)) == list(range(1, 7))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_export_gives_the_engines_logits(learnable_dataset, tmp_path):
    out, saved = tmp_path / "run", tmp_path / "logits.pt"
    run = launch("tests/dist_scripts/train_and_logits.py", [str(saved), *flags(learnable_dataset, out, max_steps=3,
                                                                                export="true")])
    ok(run, "train + logits")
    from transformers import AutoModelForCausalLM

    ref = torch.load(saved)
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    with torch.no_grad():
        got = model(input_ids=ref["ids"]).logits
    torch.testing.assert_close(got, ref["logits"], atol=1e-4, rtol=1e-4)


def test_world_size_change_needs_universal_and_then_continues_the_data(learnable_dataset, reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    (out / "checkpoints" / "latest").write_text("step_00000008\n")
    for path in (out / "examples").glob("rank*.jsonl"):  # forget steps 9-10: they are redone below
        keep = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= 8]
        path.write_text("".join(ln + "\n" for ln in keep))
    refused = launch(FINETUNE, flags(learnable_dataset, out), nprocs=1)
    assert refused.returncode not in (0, None)
    assert "--universal" in refused.output
    resumed = launch(FINETUNE, flags(learnable_dataset, out, universal="true"), nprocs=1)
    ok(resumed, "universal resume on 1 rank")
    assert json.loads((out / "DONE.json").read_text())["step"] == 10
    seen = examples(out)
    before = {tuple(e) for (rank, step), batches in seen.items() if step <= 8 for b in batches for e in b}
    after = [tuple(e) for (rank, step), batches in seen.items() if step > 8 for b in batches for e in b]
    assert len(after) == 2 * 4 and not before & set(after)  # 2 steps x 4 examples, none seen before


def test_resume_with_another_length_is_refused_unless_stretched(learnable_dataset, reference, tmp_path):
    """The reference run (10 steps) resumed from step 8 with --max-steps 12: refused, naming the flag
    (its LR and PPT schedules would change mid-run); with --schedule-change stretch it goes on to 12."""
    out = tmp_path / "run"
    _resumable_from_step_8(reference, out)
    refused = launch(FINETUNE, flags(learnable_dataset, out, max_steps=12))
    assert refused.returncode not in (0, None)
    assert "--max-steps 10 -> 12 changes the run's length" in refused.output and "--schedule-change stretch" in \
        refused.output, refused.tail()
    stretched = launch(FINETUNE, flags(learnable_dataset, out, max_steps=12, schedule_change="stretch"))
    ok(stretched, "stretched resume")
    assert "resumed at step 8" in stretched.output
    assert json.loads((out / "DONE.json").read_text()) == {"step": 12, "total_steps": 12}
    lr = dict(read_scalars(str(out / "tb"))["train/lr"])
    assert sorted(lr) == list(range(1, 13)) and lr[12] == 0.0  # the cosine now ends at step 12


def _resumable_from_step_8(reference: Path, out: Path) -> None:
    import shutil

    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_00000010")
    (out / "checkpoints" / "latest").write_text("step_00000008\n")
    (out / "DONE.json").unlink()


def test_resume_with_another_deepspeed_config_is_refused_unless_accepted(learnable_dataset, reference, tmp_path):
    """Other Adam betas (the optimisation itself) are refused, naming the key; a bucket size (speed
    only) is not named; --ds-config-change accept continues."""
    out = tmp_path / "run"
    _resumable_from_step_8(reference, out)
    ds = json.loads((Path(__file__).parents[1] / "ds_configs" / "zero3.json").read_text())
    ds["optimizer"]["params"]["betas"] = [0.8, 0.99]
    ds["zero_optimization"]["reduce_bucket_size"] = 1e6
    changed = tmp_path / "zero3-betas.json"
    changed.write_text(json.dumps(ds))
    refused = launch(FINETUNE, flags(learnable_dataset, out, ds_config=changed))
    assert refused.returncode not in (0, None)
    assert "differs from the run's in optimizer.params.betas (" in refused.output, refused.tail()
    assert "--ds-config-change accept" in refused.output and "reduce_bucket_size" not in refused.output
    accepted = launch(FINETUNE, flags(learnable_dataset, out, ds_config=changed, ds_config_change="accept"))
    ok(accepted, "resume with --ds-config-change accept")
    assert json.loads((out / "DONE.json").read_text())["step"] == 10


def test_ppt_curriculum_follows_global_progress_after_a_world_size_change(learnable_dataset, tmp_path):
    """A PPT run on 2 ranks, resumed at step 4 on 1 rank (--universal): the resumed steps draw their
    layouts at p of steps 4 and 5 of the 6-step schedule, as the uninterrupted run did; not at p of
    step 0 (the stream restarts its batch count on the examples nobody consumed)."""
    from patchrec_dist.patching.layouts import ppt_probability

    ppt = dict(stage="ppt", max_steps=6, ppt_schedule="linear", log_examples="false")
    ref = tmp_path / "ref"
    ok(launch(FINETUNE, flags(learnable_dataset, ref, **ppt)), "PPT reference run")
    want = dict(read_scalars(str(ref / "tb"))["train/ppt_p"])
    assert want == pytest.approx({s: ppt_probability(s - 1, 6) for s in range(1, 7)})

    import shutil

    out = tmp_path / "run"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    (out / "checkpoints" / "latest").write_text("step_00000004\n")
    (out / "DONE.json").unlink()
    resumed = launch(FINETUNE, flags(learnable_dataset, out, universal="true", **ppt), nprocs=1)
    ok(resumed, "universal PPT resume on 1 rank")
    got = dict(read_scalars(str(out / "tb"))["train/ppt_p"])
    assert {s: got[s] for s in (5, 6)} == pytest.approx({5: want[5], 6: want[6]})


@pytest.mark.s3
@pytest.mark.timeout(300)
def test_tensorboard_on_s3_survives_a_sigkill_at_the_commit(learnable_dataset, reference, tmp_path, s3_env):
    """The whole job SIGKILLed the moment the first checkpoint's `latest` is on S3, then resumed
    from an empty staging folder (a new node): tb/ on S3 holds every step once, as the
    uninterrupted run's."""
    bucket, fs = s3_env["bucket"], s3_env["fs"]
    url = f"s3://{bucket}/run"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "PATCHREC_S3_ENDPOINT": s3_env["endpoint"], "PATCHREC_STAGING": str(tmp_path / "staging-a")}
    first = launch("tests/dist_scripts/finetune_killed_at_commit.py", flags(learnable_dataset, url, save_every=4),
                   env=env)
    assert first.returncode == -signal.SIGKILL and "killing the job" in first.output, first.tail()
    assert fs.cat(f"{bucket}/run/checkpoints/latest").decode().strip() == "step_00000004"
    fs.get(f"{bucket}/run/tb", str(tmp_path / "at-kill" / "tb"), recursive=True)
    assert sorted(losses(tmp_path / "at-kill")) == [1, 2, 3, 4], "tb/ on S3 lags the committed checkpoint"

    env["PATCHREC_STAGING"] = str(tmp_path / "staging-b")
    ok(launch(FINETUNE, flags(learnable_dataset, url, save_every=4), env=env), "resume from S3")
    fs.invalidate_cache()
    fs.get(f"{bucket}/run/tb", str(tmp_path / "done" / "tb"), recursive=True)
    scalars, a = read_scalars(str(tmp_path / "done" / "tb")), losses(reference)
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert [s for s, _ in scalars[name]] == list(range(1, 11)), (name, scalars[name])
    assert all(abs(a[s] - v) <= 1e-5 for s, v in scalars["train/loss"])


def one_process_run(data: str, out: Path, **over) -> dict[str, dict[int, float]]:
    """The real trainer in one process (fp32, ZeRO-3, 3 steps): loss, gradient norm (before clipping)
    and label tokens per step."""
    proc = subprocess.run(
        [sys.executable, FINETUNE, *flags(data, out, **{"max_steps": 3, "save_every": 0, "num_workers": 0,
                                                        "log_examples": "false", **over})],
        cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = read_scalars(str(out / "tb"))
    return {name: dict(scalars[name]) for name in ("train/loss", "train/grad_norm", "train/label_tokens",
                                                   "train/padding_frac")}


def assert_same_steps(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> None:
    assert a["train/label_tokens"] == b["train/label_tokens"]  # the same examples each step
    for name in ("train/loss", "train/grad_norm"):
        assert sorted(a[name]) == [1, 2, 3]
        for step, value in a[name].items():
            assert abs(b[name][step] - value) <= 1e-5 * max(1.0, abs(value)), (name, step, value, b[name][step])


def test_grad_accum_equals_one_micro_batch_of_the_combined_size(learnable_dataset, tmp_path):
    """--grad-accum 2 --micro-batch 2 against --grad-accum 1 --micro-batch 4 in the real trainer: the
    same examples per step, so the token-weighted loss and the gradient of every step agree."""
    assert_same_steps(one_process_run(learnable_dataset, tmp_path / "big", micro_batch=4, grad_accum=1),
                      one_process_run(learnable_dataset, tmp_path / "accum", micro_batch=2, grad_accum=2))


def test_packed_micro_batches_train_like_padded_ones(learnable_dataset, tmp_path):
    """Packing (the default on CPU ranks: one row per micro-batch, sdpa_varlen) against --packing
    false (right padding) through DeepSpeed ZeRO-3 with PFT-S patches: every step's loss and gradient
    norm agree, three optimizer steps on. The packed run also profiles steps 2-3 (--profile-steps)."""
    padded = one_process_run(learnable_dataset, tmp_path / "padded", packing="false", stage="pft-s")
    packed = one_process_run(learnable_dataset, tmp_path / "packed", stage="pft-s", profile_steps="2-3")
    assert_same_steps(padded, packed)
    assert min(padded["train/padding_frac"].values()) > 0.05 and max(packed["train/padding_frac"].values()) == 0
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["packing"] is True  # resolved, recorded
    profile = json.loads((tmp_path / "packed" / "profile" / "ops.json").read_text())
    assert profile["steps"] == [2, 3] and profile["device"] == "cpu" and len(profile["ops"]) >= 10
    names = {op["name"] for op in profile["ops"]}
    assert any(n.startswith("aten::") for n in names), names
    assert profile["total_self_cpu_ms"] > 0 and (tmp_path / "packed" / "profile" / "trace.json").stat().st_size > 1000
    assert not (tmp_path / "padded" / "profile").exists()


def test_packing_by_default_follows_the_device_and_kernel():
    from patchrec_dist.model.packed_attention import packing_by_default

    assert packing_by_default("cpu", "sdpa") and packing_by_default("cuda", "flash_attention_2")
    assert not packing_by_default("cuda", "sdpa")  # the per-example loop: 2.6x padding's step time on an H200


@pytest.mark.parametrize("spec", ["3-2", "0", "two"])
def test_a_bad_profile_window_names_the_flag(spec):
    from patchrec_dist.train.config import TrainConfig

    with pytest.raises(ValueError, match="--profile-steps"):
        TrainConfig(data="d", output="o", profile_steps=spec).check()


@pytest.mark.parametrize("ds_config, bf16, tolerance", [
    ("ds_configs/zero2.json", False, 1e-5),
    ("ds_configs/zero3_offload.json", False, 1e-5),  # the optimizer offloaded: DeepSpeed's CPU Adam
    ("ds_configs/zero3.json", True, 0.0),  # bf16 on CPU ranks: the resumed steps repeat the same bf16 ops
])
def test_other_deepspeed_configs_and_bf16_train_resume_exactly_and_export(ds_config, bf16, tolerance,
                                                                          learnable_dataset, tmp_path):
    """Each config end to end on 2 CPU ranks: 6 steps with a checkpoint at step 3, then a second run
    started from that checkpoint, whose steps 4-6 must repeat the first run's losses; the export is
    in the training dtype."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    over = {"max_steps": 6, "save_every": 3, "ds_config": ds_config, "bf16": str(bf16).lower(), "export": "true",
            "log_examples": "false", "num_workers": 0}
    first = launch(FINETUNE, flags(learnable_dataset, full, **over), timeout=400)  # the first offload run builds CPU Adam
    ok(first, "the uninterrupted run")
    second = launch(FINETUNE, flags(learnable_dataset, resumed, **over,
                                    resume=str(full / "checkpoints" / "step_00000003")), timeout=200)
    ok(second, "the run resumed from its step-3 checkpoint")
    assert "resumed at step 3" in second.output
    a, b = losses(full), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    for step in b:
        assert abs(a[step] - b[step]) <= tolerance, (step, a[step], b[step])
    if "offload" in ds_config:
        assert "DeepSpeedCPUAdam" in first.output, first.tail()
    config = json.loads((full / "final" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == ("bfloat16" if bf16 else "float32")
