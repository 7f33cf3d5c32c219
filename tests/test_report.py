"""README's results section is generated from bench/results/*.json and must stay in step with it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.distlaunch import REPO


def test_readme_results_section_matches_the_benchmark_files():
    proc = subprocess.run([sys.executable, "bench/report.py", "--check"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_report_renders_quality_rows_and_detects_a_stale_readme(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    row = {"metrics": {"HR@1": 0.01, "HR@5": 0.05, "HR@10": 0.1, "HR@20": 0.2, "NDCG@10": 0.05, "NDCG@20": 0.07},
           "examples": 64}
    quality = {"data": "ml-100k", "model": "smollm2", "steps": 30, "micro_batch": 2, "ranks": 2, "lr": 1e-4,
               "examples": 64, "command": "python bench/quality.py", "machine": {"device": "CPU", "cpus": 2},
               "total_s": 600, "history": {"metrics": "history not masked (the released PatchRec protocol)",
                                           "metrics_seen_masked": "history masked (--exclude-seen)"},
               "rows": {"pft-s(5)": {**row, "positions_fed_per_example": 61.7,
                                     "metrics_seen_masked": {**row["metrics"], "HR@1": 0.03}},
                        "sasrec": {**row, "positions_fed_per_example": None, "metrics_seen_masked": row["metrics"]}}}
    (results / "quality-ml-100k.json").write_text(json.dumps(quality))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin (bench/report.py writes this) -->\nold\n<!-- results:end -->\nend\n")
    args = [sys.executable, "bench/report.py", "--readme", str(readme), "--results", str(results)]
    assert subprocess.run([*args, "--check"], cwd=REPO, capture_output=True, timeout=60).returncode == 1
    assert subprocess.run(args, cwd=REPO, capture_output=True, timeout=60).returncode == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    unmasked, masked = text.split("History not masked")[1].split("History masked (--exclude-seen)")
    assert "| pft-s(5) | 62 | 0.0100 | 0.0500 | 0.1000 | 0.2000 | 0.0500 | 0.0700 |" in unmasked
    assert "| pft-s(5) | 62 | 0.0300 | 0.0500 | 0.1000 | 0.2000 | 0.0500 | 0.0700 |" in masked
    assert "| sasrec | - |" in text
    assert subprocess.run([*args, "--check"], cwd=REPO, capture_output=True, timeout=60).returncode == 0
