"""benchmarks/gpu_check.py: the dry run end to end (so the script cannot rot between GPU loans),
and how one failing item is recorded."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("environment", "correctness", "timings", "distributed", "summary")
CORRECTNESS = {"mixing_closed_form_float64", "mixing_closed_form_blocks", "mixing_closed_form_float32_scale",
               "hard_pool_vs_topk", "info_nce", "queue", "bank_faiss_vs_torch", "search_and_eval_vs_cpu",
               "bf16_moco_step", "bf16_text_step"}
TIMINGS = {"mixing_head", "image_step", "text_step", "exact_search"}


def load_gpu_check():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_a_complete_passing_report(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # ~30-50 s; 300 for a busy machine
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and all(section in report for section in SECTIONS)
    assert report["environment"]["status"] == "passed" and report["environment"]["result"]["torch"] == torch.__version__
    assert set(report["correctness"]) == CORRECTNESS and set(report["timings"]) == TIMINGS
    for section in ("correctness", "timings"):
        for name, item in report[section].items():
            assert item["status"] == "passed", (name, item.get("traceback"))
    assert report["correctness"]["mixing_closed_form_float64"]["result"]["s=7,s'=5"]["max_grad_err"] < 1e-10
    assert report["timings"]["image_step"]["result"]["mochi_vs_plain"] > 0
    assert report["distributed"]["gloo_parity"]["status"] == "passed"
    assert "1 passed" in report["distributed"]["gloo_parity"]["result"]["summary"]
    assert "unverified" in report["distributed"]["nccl"]
    assert report["summary"]["ok"] and not report["summary"]["correctness_failed"]
    assert "## gpu_check" in (tmp_path / "gpu_check.md").read_text()
    assert results.read_bytes() == before  # a dry run appends nothing to RESULTS.md


def test_a_failing_item_is_recorded_with_its_traceback_and_fails_the_summary():
    gpu_check = load_gpu_check()

    def broken() -> dict:
        raise AssertionError("closed form differs")

    cpu = torch.device("cpu")
    failed = gpu_check.run_item("correctness.example", broken, cpu)
    assert failed["status"] == "failed" and "closed form differs" in failed["error"]
    assert "Traceback" in failed["traceback"] and "broken" in failed["traceback"]
    passed = gpu_check.run_item("correctness.other", lambda: {"x": 1}, cpu)
    report = {"environment": {"status": "passed", "result": {"faiss_num_gpus": 0}},
              "correctness": {"example": failed, "other": passed},
              "timings": {"t": gpu_check.run_item("timings.t", broken, cpu)},
              "distributed": {"gloo_parity": passed, "nccl": gpu_check.NCCL}}
    summary = gpu_check.summarise(report)
    assert not summary["ok"] and summary["correctness_failed"] == ["example"] and summary["timings_failed"] == ["t"]
    assert summary["correctness_passed"] == 2
    report.update(summary=summary, wall_seconds=1.0, device="cpu")
    assert "closed form differs" in gpu_check.markdown(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_and_without_dry_run_it_says_so(capsys):
    assert load_gpu_check().main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
