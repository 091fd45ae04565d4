"""train.keep_host_memory: freed host memory is reused instead of faulted in again; results are unchanged."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import CONFIG, tiny_overrides

from mochi_retrieval.training import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MODULE = Path(host_memory.__file__)

# A fresh process allocates, touches and frees 32 blocks of 1 MiB twice and prints the minor page faults of
# the second round. The module is loaded from its file, so the process imports nothing that allocates.
CYCLES = textwrap.dedent(f"""
    import ctypes, importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("host_memory", {str(MODULE)!r})
    hm = importlib.util.module_from_spec(spec); spec.loader.exec_module(hm)
    if sys.argv[1] == "keep":
        assert hm.keep_freed_host_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def cycle():
        blocks = [libc.malloc(1 << 20) for _ in range(32)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks:
            libc.free(b)
    cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cycle()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
PAGES = 32 * (1 << 20) // 4096


def second_round_faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", CYCLES, setting], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_where_the_default_faults_it_in_again() -> None:
    # Control: with glibc's defaults the second round faults most of its pages in again, so the test can fail.
    assert second_round_faults("default") > PAGES // 2
    assert second_round_faults("keep") < PAGES // 20


def test_off_glibc_nothing_is_changed(monkeypatch) -> None:
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory.keep_freed_host_memory() is False


def test_training_results_are_the_same_either_way(tmp_path, tiny_fmnist_dir) -> None:
    # Each run in its own process: glibc's thresholds, once set, hold for the whole process.
    out = {}
    for keep in ("true", "false"):
        run = tmp_path / keep
        overrides = tiny_overrides(tiny_fmnist_dir, run, **{"train.max_steps": 6, "mochi.warmup_epochs": 0,
                                                             "eval.linear_probe": "false",
                                                             "train.keep_host_memory": keep})
        subprocess.run([sys.executable, "-m", "mochi_retrieval.train", str(CONFIG), *overrides], check=True,
                       capture_output=True)
        out[keep] = ((run / "metrics.jsonl").read_text(), (run / "encoder.pt").read_bytes())
    assert out["true"][0].count('"loss"') == 6
    assert out["true"] == out["false"]
