"""tools/inspect_patching.py on a real data set (the --data mode)."""

from __future__ import annotations

import json
import subprocess
import sys

from patchrec_dist.data.manifest import load_manifest
from patchrec_dist.data.stream import read_shard
from tests.conftest import REPO


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/inspect_patching.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_picture_of_a_users_history(small_dataset):
    m = load_manifest(small_dataset)
    rec = next(r for r in read_shard(m, 0) if len(r.items) > 30)
    proc = run("--data", small_dataset, "--user", rec.user, "--split", "test", "--stage", "pft-s", "--group-size", "4")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"user {rec.user}, test target at position {len(rec.items) - 1}" in out
    assert "session [0-" in out and "positions fed:" in out
    assert out.count("\ntext ") == 4 and out.count("\nitem ") == 4
    js = run("--data", small_dataset, "--user", rec.user, "--stage", "pft-i", "--item-len", "3", "--json")
    segs = json.loads(js.stdout)["segments"]
    assert [s["kind"] for s in segs[-3:]] == ["text"] * 3 and segs[0]["kind"] == "item"
    assert sum(len(s["items"]) for s in segs) == min(100, len(rec.items) - 1)


def test_data_mode_errors_name_the_flag(small_dataset, tmp_path):
    proc = run("--data", small_dataset, "--user", "no-such-user", "--stage", "text")
    assert proc.returncode == 2 and "--user no-such-user" in proc.stderr
    proc = run("--data", str(tmp_path), "--user", "1", "--stage", "text")
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
    proc = run("--data", small_dataset, "--stage", "text")
    assert proc.returncode == 2 and "--user" in proc.stderr
