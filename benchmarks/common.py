"""Shared helpers for the benchmarks: timing, machine description, RESULTS.md."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


class OneCpuProcess:
    """The fields of an accelerate ``Accelerator`` that ``build_data`` reads: one process, on the CPU."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per function, measured round-robin so drift hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_section(title: str, body: str) -> str:
    """A RESULTS.md section: title, the command that produced it, time and machine, then ``body``."""
    script = Path(sys.argv[0]).resolve()
    try:  # as run from the repository root
        script = script.relative_to(RESULTS.parents[1])
    except ValueError:
        pass
    command = "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"\n## {title}\n\n`{command}`\n\n{stamp}; {machine()}\n\n{body}\n"


def append_results(title: str, body: str) -> None:
    """Append a section with the command that produced it and the machine."""
    with RESULTS.open("a") as f:
        f.write(results_section(title, body))


def training_step(model: torch.nn.Module, lr: float, batches: list[dict]) -> Callable[[], None]:
    """One timed training step of a MoCo model per call, cycling through ``batches``: forward with MoCHi
    active (epoch 1.0), backward, SGD step. The step index advances, so MoCHi's draws differ per call."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    cursor = [0]

    def step() -> None:
        cursor[0] += 1
        model(**batches[cursor[0] % len(batches)], epoch=1.0, step=cursor[0])["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (Linux): "VmRSS", "VmHWM", "RssAnon", ..."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
