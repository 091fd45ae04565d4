"""Runs tests/resilience_suite.py (kill -9, signals, failed peers, corrupt files) in a fresh pytest process.

That suite forks training processes. A fork taken while other threads of the parent hold locks (torch's
intra-op pool, started by earlier tests of this session) can deadlock the child, so the suite runs in a
process of its own with one intra-op thread, where forking is safe.
"""
import os
import subprocess
import sys
from pathlib import Path


def test_resilience_suite_in_a_fresh_single_threaded_process():
    suite = Path(__file__).with_name("resilience_suite.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
