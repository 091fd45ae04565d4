"""Training that survives real clusters: step checkpoints, kill -9, SIGTERM, unreadable or unwritable
checkpoints, a failed or hung peer, corrupt data files.

Interrupted runs are forked from the test process (torch is already imported, so a run costs its
training steps only) and killed or signalled at chosen points by hooks installed in the child; the
resumed run must then equal one uninterrupted reference run. One test goes through ``accelerate launch``.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import make_tiny_fmnist
from test_train import CONFIG, losses, tiny_overrides

from mochi_retrieval import train
from mochi_retrieval.training import checkpoints as checkpoint
from mochi_retrieval.training.loop import EXIT_INTERRUPTED, Trainer

# 2 epochs of 6 steps, a checkpoint every 2 steps (checkpoint settings are not part of the fingerprint).
RUN = {"eval.linear_probe": "false", "train.epochs": 2, "train.checkpoint_every_steps": 2}


def args(data: Path, out: Path, **extra) -> list[str]:
    return [str(CONFIG), *tiny_overrides(data, out, **{**RUN, **extra})]


def step_records(out: Path) -> list[int]:
    """Steps of the loss records of metrics.jsonl, in file order (duplicates kept)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def final_model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]


def assert_same_run(out: Path, reference: Path) -> None:
    """Each step logged once, the same losses and the same final model (queue included) as the reference."""
    assert step_records(out) == list(range(1, 13))
    a, b = losses(reference), losses(out)
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    ref, got = final_model(reference), final_model(out)
    assert sorted(ref) == sorted(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_fmnist(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted one-process run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(args(data, out)) == 0
    _reset_accelerate()
    return out


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# --------------------------------------------------------------------------- forked runs


def fork(target: Callable[[], int], log: Path, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """Run ``target`` (which installs its hooks, then trains) in a forked child; stdout/stderr/logs go to ``log``."""

    def child() -> None:
        os.environ.update(env or {})
        sys.stdout = sys.stderr = open(log, "w", buffering=1)
        logging.root.handlers.clear()  # pytest's capture handlers: let train.main log to the file instead
        _reset_accelerate()
        code = target()
        sys.stderr.flush()
        os._exit(code)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    return process


def finish(process: multiprocessing.Process, log: Path, timeout: float = 600) -> int:
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"child did not finish in {timeout} s:\n{log.read_text()[-3000:]}")
    return process.exitcode


def at_step(step: int, action: Callable[[], None]) -> None:
    """Call ``action`` just before the micro-batch that makes optimiser step ``step`` starts."""
    original = Trainer._micro_step

    def hooked(self, batch, bar, window):
        if self.global_step == step - 1:  # one micro-batch per step in these runs
            action()
        return original(self, batch, bar, window)

    Trainer._micro_step = hooked


def kill_self(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


# --------------------------------------------------------------------------- kill -9 then resume


def kill_after_logging_a_step() -> None:
    """SIGKILL once step 5 is done and logged, before the loop looks at signals and checkpoints."""
    original = Trainer._poll

    def hooked(self):
        if self.global_step == 5:
            kill_self()
        return original(self)

    Trainer._poll = hooked


def kill_during_checkpoint_write() -> None:
    """SIGKILL with half of the step-4 checkpoint written to its temporary file."""
    real_save = torch.save

    def half_then_die(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            kill_self()
        return real_save(obj, f, *a, **k)

    torch.save = half_then_die


def kill_before_last_link() -> None:
    """SIGKILL after step-00000006.pt is in place, before last.pt points at it."""
    original = checkpoint.CheckpointDir._point_latest

    def hooked(self, path):
        if checkpoint.step_of(path) == 6:
            kill_self()
        return original(self, path)

    checkpoint.CheckpointDir._point_latest = hooked


def kill_during_log_write() -> None:
    """SIGKILL with half of step 9's metrics.jsonl line written."""
    original = Trainer._log

    def hooked(self, record):
        if record["step"] == 9:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record)[:20])
            kill_self()
        return original(self, record)

    Trainer._log = hooked


@pytest.mark.parametrize("hook,resumed_from", [
    (kill_after_logging_a_step, 4), (kill_during_checkpoint_write, 2), (kill_before_last_link, 6),
    (kill_during_log_write, 8),
])
def test_kill_9_then_resume_equals_uninterrupted_run(data, reference, tmp_path, hook, resumed_from, caplog):
    out, log = tmp_path / "run", tmp_path / "child.log"

    def killed_run() -> int:
        hook()
        return train.main(args(data, out))

    assert finish(fork(killed_run, log), log) == -signal.SIGKILL, log.read_text()[-3000:]
    with caplog.at_level(logging.INFO, logger="mochi_retrieval"):
        assert train.main(args(data, out)) == 0
    assert f"step-{resumed_from:08d}.pt at step {resumed_from} " in caplog.text, caplog.text[-2000:]
    assert_same_run(out, reference)
    # keep_checkpoints=2: the last two step files, last.pt the newest of them; no temporary left over.
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.pt", "step-00000010.pt", "step-00000012.pt"], names
    assert os.path.samefile(out / "checkpoints/last.pt", out / "checkpoints/step-00000012.pt")


# --------------------------------------------------------------------------- SIGTERM / SIGUSR1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_the_step_and_exits_75(data, reference, tmp_path, sig):
    out, log = tmp_path / "run", tmp_path / "child.log"

    def signalled_run() -> int:
        at_step(3, lambda: kill_self(sig))  # arrives during step 3: the step is finished first
        return train.main(args(data, out))

    assert finish(fork(signalled_run, log), log) == EXIT_INTERRUPTED == 75
    text = log.read_text()
    assert f"interrupted: stopped by {sig.name} after step 3" in text and "Traceback" not in text, text[-3000:]
    assert torch.load(out / "checkpoints/step-00000003.pt", weights_only=True)["global_step"] == 3
    assert step_records(out) == [1, 2, 3]
    assert train.main(args(data, out)) == 0
    assert_same_run(out, reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(target: Callable[[int], int], tmp_path: Path,
                  name: str) -> list[tuple[multiprocessing.Process, Path]]:
    """Fork ranks 0 and 1 of a gloo group, as a launcher without an agent (srun) would start them."""
    port = str(free_port())
    started = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CUDA_VISIBLE_DEVICES": ""}
        log = tmp_path / f"{name}.rank{rank}.log"
        started.append((fork(lambda rank=rank: target(rank), log, env), log))
    return started


def test_sigterm_on_one_of_two_processes_stops_both_at_the_same_step(data, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"

    def run(out: Path, stop_rank: int | None) -> Callable[[int], int]:
        def target(rank: int) -> int:
            if rank == stop_rank:
                at_step(4, lambda: kill_self(signal.SIGTERM))  # only rank 1 is told
            return train.main(args(data, out))
        return target

    for phase, (out, stop_rank, code) in enumerate(((full, None, 0), (cut, 1, EXIT_INTERRUPTED), (cut, None, 0))):
        ranks = two_processes(run(out, stop_rank), tmp_path, f"phase{phase}")
        codes = [finish(p, log) for p, log in ranks]
        assert codes == [code, code], "\n".join(log.read_text()[-2000:] for _, log in ranks)
        if code == EXIT_INTERRUPTED:
            for _, log in ranks:
                assert "after step 4; checkpoint" in log.read_text()
            assert torch.load(cut / "checkpoints/step-00000004.pt", weights_only=True)["global_step"] == 4
    assert_same_run(cut, full)


def test_sigterm_to_accelerate_launch_checkpoints_and_stops_both_processes(data, tmp_path):
    """The scheduler signals the launcher, which forwards SIGTERM to its workers.

    At step 3 the main worker writes a marker file and waits for the signal; the test then sends
    SIGTERM to the launcher (never to a pid the worker guesses)."""
    out, marker = tmp_path / "ddp", tmp_path / "at_step_3"
    script = tmp_path / "wait_for_sigterm_at_step_3.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "from mochi_retrieval import train\n"
        "from mochi_retrieval.training.loop import Trainer\n"
        "original = Trainer._maybe_log\n"
        "def hooked(self, *a, **k):\n"
        "    if self.global_step == 3 and self.acc.is_main_process:\n"
        f"        pathlib.Path({str(marker)!r}).touch()\n"
        "        deadline = time.monotonic() + 300\n"
        "        while self._signals.received is None and time.monotonic() < deadline:\n"
        "            time.sleep(0.05)\n"
        "    return original(self, *a, **k)\n"
        "Trainer._maybe_log = hooked\n"
        "sys.exit(train.main(sys.argv[1:]))\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           *args(data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # A session of its own: on a timeout the launcher and its workers go together (orphaned workers
    # would hold the output pipes open).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert marker.exists(), stderr[-3000:]
    assert proc.returncode != 0  # the launcher itself re-raises the signal after its workers have stopped
    stopped = [line.split("interrupted: ")[1] for line in stderr.splitlines() if "interrupted: stopped by" in line]
    assert len(stopped) == 2, stderr[-3000:]
    steps = {int(line.split("after step ")[1].split(";")[0]) for line in stopped}
    assert len(steps) == 1, stopped  # both processes stopped after the same step
    step = steps.pop()
    assert 3 <= step < 12
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["global_step"] == step


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- a failing or hung peer


@pytest.mark.parametrize("failure", ["raises", "hangs"])
def test_failed_peer_stops_the_other_process_within_the_timeout(data, tmp_path, failure):
    timeout_s = 6.0  # train.dist_timeout_minutes=0.1

    def target(rank: int) -> int:
        if rank == 1:
            def fail() -> None:
                if failure == "raises":
                    raise ValueError("rank 1 failed on purpose")
                kill_self(signal.SIGSTOP)  # hung: alive, holding its connections, never answering
            at_step(3, fail)
        return train.main(args(data, tmp_path / "run", **{"train.dist_timeout_minutes": timeout_s / 60}))

    ranks = two_processes(target, tmp_path, failure)
    start = time.monotonic()
    (p0, log0), (p1, log1) = ranks
    try:
        code0 = finish(p0, log0)
        elapsed = time.monotonic() - start
    finally:
        p1.kill()  # the hung one; a no-op on an exited one
        p1.join()
    text = log0.read_text()
    assert code0 == 1, text[-3000:]
    assert "process 0 of 2: a collective operation failed after step 2" in text, text[-3000:]
    assert "train.dist_timeout_minutes=0.1" in text and "Traceback" not in text
    if failure == "hangs":  # rank 0 gave up on its own, after the configured timeout
        assert "Timed out waiting 6000ms" in text, text[-3000:]
    assert elapsed < 600  # rank 0 stopped by itself (start-up included; a few seconds on an idle machine)
    if failure == "raises":
        assert p1.exitcode == 1 and "rank 1 failed on purpose" in log1.read_text()


# --------------------------------------------------------------------------- unreadable and unwritable checkpoints


def test_truncated_latest_checkpoint_falls_back_with_a_warning(data, reference, tmp_path, caplog):
    out = tmp_path / "run"
    assert train.main(args(data, out, **{"train.max_steps": 4})) == 0
    latest = out / "checkpoints/last.pt"
    assert os.path.samefile(latest, out / "checkpoints/step-00000004.pt")
    with latest.open("r+b") as f:  # cut short: truncates step-00000004.pt too (one file, two names)
        f.truncate(latest.stat().st_size // 3)
    with caplog.at_level(logging.INFO, logger="mochi_retrieval"):
        assert train.main(args(data, out)) == 0
    assert "step-00000004.pt cannot be read (truncated or not a checkpoint)" in caplog.text
    assert "resuming from" in caplog.text and "step-00000002.pt" in caplog.text
    assert (out / "checkpoints/step-00000004.pt.unreadable").is_file()
    assert_same_run(out, reference)


def test_no_readable_checkpoint_is_an_error_naming_the_files(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(args(data, out, **{"train.max_steps": 2})) == 0
    (out / "checkpoints/step-00000002.pt").write_text("not a checkpoint\n")  # last.pt is the same file
    assert train.main(args(data, out)) == 1
    err = capsys.readouterr().err
    assert "no checkpoint can be read" in err and "step-00000002.pt cannot be read" in err
    assert "Traceback" not in err


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def disk_full_at_step_4(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("global_step") == 4:
            f.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    assert train.main(args(data, out, **{"train.max_steps": 6})) == 1
    err = capsys.readouterr().err
    previous = out / "checkpoints/step-00000002.pt"
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"the previous checkpoint {previous} is intact" in err
    assert sorted(p.name for p in previous.parent.iterdir()) == ["last.pt", "step-00000002.pt"]  # no temporary
    assert checkpoint.load(previous)["global_step"] == 2 and os.path.samefile(previous, previous.parent / "last.pt")


def test_checkpoint_every_minutes(data, tmp_path):
    out = tmp_path / "run"
    assert train.main(args(data, out, **{"train.checkpoint_every_steps": "null", "train.max_steps": 3,
                                         "train.checkpoint_every_minutes": 1e-5, "train.keep_checkpoints": 3})) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.pt", "step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]


def test_checkpoint_dir_keeps_the_newest_and_replaces_an_earlier_runs(tmp_path):
    folder = checkpoint.CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (3, 6, 9):
        folder.save({"global_step": step}, step)
    assert [p.name for p in folder.step_files()] == ["step-00000009.pt", "step-00000006.pt"]
    assert folder.candidates() == folder.step_files()  # last.pt is step 9 itself
    folder.save({"global_step": 1}, 1, replace_others=True)  # a fresh run's first checkpoint
    assert [p.name for p in folder.step_files()] == ["step-00000001.pt"]
    assert checkpoint.load(folder.latest)["global_step"] == 1
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000001\.pt is not a training checkpoint: "
                                                         r"it lacks model"):
        checkpoint.load(folder.step_path(1), required=("global_step", "model"))


# --------------------------------------------------------------------------- corrupt data files


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    from test_train import make_image_folder

    from mochi_retrieval.data.images import CorruptImageError, FolderViews, Sharding

    root = make_image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "train" / "dog" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    views = FolderViews(str(root / "train"), Sharding(8), seed=0, image_size=16, num_workers=0)
    with pytest.raises(CorruptImageError, match=rf"image {bad} cannot be decoded.*skip_corrupt_images=true"):
        list(views.epoch(0))
    views = FolderViews(str(root / "train"), Sharding(8), seed=0, image_size=16, num_workers=0, skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        batches = list(views.epoch(0))
    assert [len(b["ids"]) for b in batches] == [8] and views.skipped == 1
    assert str(bad) in caplog.text and "1 undecodable image file(s) skipped" in caplog.text


def test_corrupt_image_in_a_worker_is_a_one_line_error(tmp_path, capsys):
    from test_train import make_image_folder

    root = make_image_folder(tmp_path / "imgs", per_class=4)
    bad = root / "train" / "cat" / "1.png"
    bad.write_text("not an image")
    code = train.main([str(CONFIG), *tiny_overrides(root, tmp_path / "run", **{
        "data.dataset": "imagefolder", "data.image_size": 16, "data.num_workers": 1, "train.batch_size": 8,
        "model.encoder_kwargs": "{width: 8, small_images: true}", "train.epochs": 1, "eval.linear_probe": "false"})])
    err = capsys.readouterr().err
    assert code == 1 and f"error: image {bad} cannot be decoded" in err and "Traceback" not in err


@pytest.mark.parametrize("name,content,message", [
    ("p.jsonl", '{"query": "a", "positive": "b"}\n\n{"query": "c", "positive": "d"}\n', "line 2: empty line"),
    ("p.jsonl", '{"query": "a", "positive": "b"}\n{"query": "c", "positive": \n', "line 2: not valid JSON"),
    ("p.jsonl", '{"query": "a", "positive": "b"}\n["c", "d"]\n', "line 2: expected a JSON object"),
    ("p.csv", "query,positive\na,b\nc,d,e\n", "line 3: 3 fields, the header has 2"),
    ("p.tsv", "query\tpositive\na\tb\n\t\nc\td\n", "line 3: empty line"),
])
def test_bad_pairs_line_is_named(tmp_path, name, content, message):
    from mochi_retrieval.data.text_pairs import TextPairs

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}, {message}"):
        TextPairs.from_file(path, cache_dir=str(tmp_path / "cache"))


def test_trailing_blank_lines_are_fine(tmp_path):
    from mochi_retrieval.data.text_pairs import TextPairs

    path = tmp_path / "p.jsonl"
    path.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d"}\n\n\n')
    assert len(TextPairs.from_file(path, cache_dir=str(tmp_path / "cache"))) == 2
