"""The training loop: the only code that starts distributed work (through accelerate).

It owns the optimiser, schedule, mixed precision, gradient accumulation,
checkpoints (atomic; every N epochs, steps or minutes; the last few kept;
resumable mid-epoch, falling back past an unreadable file), preemption
(SIGTERM/SIGUSR1: finish the step, checkpoint, raise :class:`TrainingInterrupted`),
logging (tqdm, JSON lines, TensorBoard; a resume drops what was logged after its
checkpoint), the NaN guard and evaluator hooks. The model is any module whose
forward takes a batch dict and returns a dict with a scalar ``loss``.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import any_process, is_collective_failure, rank, replicas_agree
from . import checkpoints
from .checkpoints import CheckpointDir, CheckpointError

logger = logging.getLogger(__name__)


class TrainData(Protocol):
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


EXIT_INTERRUPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: run it again)."""

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
"""What Slurm (``--signal``) and Kubernetes send before they take a node back."""

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "micro_step", "global_step", "rng", "fingerprint")


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; every process stopped after the same step, with a checkpoint written."""

    def __init__(self, signal_name: str, step: int, path: Path) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {path} written. "
                         "Run the same command again to resume from it.")
        self.signal_name, self.step, self.path = signal_name, step, path


class CollectiveFailure(RuntimeError):
    """A collective operation failed: another process died, or hung past the process-group timeout."""


class StopSignals:
    """Context manager that records SIGTERM/SIGUSR1 instead of dying; the loop polls :attr:`received`."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training outside the main thread: %s keep their default action (no checkpoint on "
                           "preemption)", "/".join(STOP_SIGNALS))
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.received = signum  # only a flag: the loop acts on it between steps

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


@dataclass
class TrainerSettings:
    """Plain settings of the loop (the training program fills them from the config)."""

    epochs: int = 200
    max_steps: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    grad_accum_steps: int = 1
    log_every: int = 50
    diagnostics_every: int = 200
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int | None = None
    checkpoint_every_minutes: float | None = None
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0
    max_grad_norm: float | None = None
    weight_decay_1d: bool = True


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimiser step ``step``: linear warm-up, then cosine or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, s: TrainerSettings) -> list[dict[str, Any]]:
    """Trainable parameters; without ``weight_decay_1d`` biases and norm scales (1-D) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if s.weight_decay_1d:
        return [{"params": params}]
    return [{"params": [p for p in params if p.dim() > 1]},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def make_optimizer(params, s: TrainerSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}; use 'sgd' or 'adamw'")


class Trainer:
    """Runs epochs of ``data`` through ``model`` under an ``accelerate.Accelerator``.

    Args:
        model: module, ``model(**batch, epoch=..., step=...)`` returns a dict with ``loss``.
        data: batches per epoch (see :class:`TrainData`); already sharded per process.
        settings: loop settings.
        accelerator: an ``accelerate.Accelerator`` (devices, DDP, mixed precision).
        output_dir: checkpoints, logs and plots go here.
        fingerprint: a dict identifying the run's configuration; a checkpoint
            with another fingerprint is refused on resume.
        fingerprint_defaults: the fingerprint of the default configuration: entries equal to it are left
            out of that comparison (:func:`without_defaults`), so settings added after a checkpoint was
            written do not refuse it while the run leaves them at their defaults.
        step_hook: called as ``hook(step, batch, out)`` on the main process every
            ``diagnostics_every`` steps; returns extra scalars to log.
        epoch_hook: called as ``hook(epoch)`` after each epoch; returns scalars.

    Checkpoints go to ``output_dir/checkpoints/step-N.pt`` (the last
    ``keep_checkpoints``; ``last.pt`` links the newest) every
    ``checkpoint_every_epochs`` epochs, ``checkpoint_every_steps`` steps and
    ``checkpoint_every_minutes`` minutes, at the end and on SIGTERM/SIGUSR1.
    """

    def __init__(self, model: nn.Module, data: TrainData, settings: TrainerSettings, accelerator,
                 output_dir: str | Path, fingerprint: dict[str, Any] | None = None,
                 fingerprint_defaults: dict[str, Any] | None = None,
                 step_hook: Callable[..., dict[str, float]] | None = None,
                 epoch_hook: Callable[[int], dict[str, float]] | None = None) -> None:
        self.s, self.acc, self.data = settings, accelerator, data
        self.out = Path(output_dir)
        self.fingerprint = fingerprint or {}
        self.fingerprint_defaults = fingerprint_defaults or {}
        self.step_hook, self.epoch_hook = step_hook, epoch_hook
        if data.steps_per_epoch < settings.grad_accum_steps:
            raise ValueError(f"an epoch has {data.steps_per_epoch} batches, fewer than "
                             f"train.grad_accum_steps={settings.grad_accum_steps}")
        self.steps_per_epoch = data.steps_per_epoch // settings.grad_accum_steps
        # Leftover batches that would not fill an optimiser step are skipped, so
        # checkpoints always fall on optimiser-step boundaries.
        self.micro_per_epoch = self.steps_per_epoch * settings.grad_accum_steps
        self.total_steps = settings.epochs * self.steps_per_epoch
        optimizer = make_optimizer(param_groups(model, settings), settings)
        warmup = int(settings.warmup_epochs * self.steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.total_steps, warmup, settings.schedule))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.epoch, self.micro_step, self.global_step = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.ckpt = CheckpointDir(self.out / "checkpoints", settings.keep_checkpoints)
        self._saved_step: int | None = None  # step of the checkpoint on disk that this run wrote or resumed
        self._saved_at = time.monotonic()
        self._signals = StopSignals()
        self._tb = None

    # ------------------------------------------------------------------ state
    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def checkpoint_path(self) -> Path:
        """``checkpoints/last.pt``: the newest checkpoint."""
        return self.ckpt.latest

    def check_replicas(self) -> None:
        """Raise if state that must be identical on every process (the queue) differs."""
        replicated = getattr(self.unwrapped, "replicated_state", None)
        if replicated is None or self.acc.num_processes == 1:
            return
        bad = replicas_agree(replicated())
        if bad:
            raise RuntimeError(f"processes disagree on {', '.join(bad)} at step {self.global_step}")
        logger.info("replicas agree on %d tensors across %d processes", len(replicated()), self.acc.num_processes)

    def save(self) -> None:
        """Write the full training state atomically (main process only); once per step."""
        if self._saved_step == self.global_step:
            return
        self.check_replicas()
        part = getattr(self.unwrapped, "bank_shard_state", dict)()
        if part:  # a sharded bank: each process's rows in a file of its own, before the checkpoint names them
            checkpoints.save_atomic(part, self.ckpt.shard_path(self.global_step, rank(), self.acc.num_processes))
        self.acc.wait_for_everyone()
        fresh = self._saved_step is None  # this run's first checkpoint: an earlier run's files go
        self._saved_step, self._saved_at = self.global_step, time.monotonic()
        if not self.acc.is_main_process:
            return
        scaler = getattr(self.acc, "scaler", None)
        state = {
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": self.epoch, "micro_step": self.micro_step, "global_step": self.global_step,
            "rng": checkpoints.rng_state(),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "history": json.dumps(self.history),
        }
        path = self.ckpt.save(state, self.global_step, replace_others=fresh)
        logger.info("checkpoint %s written at step %d (epoch %d)", path, self.global_step, self.epoch)

    def maybe_resume(self) -> bool:
        """Load the newest readable checkpoint, if any; unreadable newer ones are set aside with a warning."""
        if not self.s.resume:
            return False
        if self.acc.is_main_process:
            self.ckpt.remove_temporaries()
        found = self._first_readable(self.ckpt.candidates())
        self.acc.wait_for_everyone()  # every process has read before a file is renamed
        if found is None:
            return False
        path, state, unreadable = found
        if self.acc.is_main_process:
            for bad in unreadable:
                logger.warning("set aside the unreadable checkpoint as %s", self.ckpt.set_aside(bad))
        self._load_state(path, state)
        return True

    def _first_readable(self, candidates: list[Path]) -> tuple[Path, dict[str, Any], list[Path]] | None:
        """(path, state, unreadable newer paths) of the first candidate that loads; raises if none does."""
        if not candidates:
            return None
        errors: list[CheckpointError] = []
        for path in candidates:
            try:
                state = checkpoints.load(path, map_location="cpu", required=CHECKPOINT_KEYS)
            except CheckpointError as err:
                errors.append(err)
                logger.warning("%s; trying the previous checkpoint", err)
                continue
            if errors:
                logger.warning("resuming from %s, the newest readable checkpoint, instead of %s",
                               path, candidates[0])
            return path, state, candidates[: len(errors)]
        raise CheckpointError("no checkpoint can be read; move them away, or use a new output_dir or "
                              "train.resume=false:\n  " + "\n  ".join(str(e) for e in errors))

    def _load_state(self, path: Path, state: dict[str, Any]) -> None:
        as_saved = json.loads(json.dumps(self.fingerprint))  # JSON's types (tuples are lists there)
        defaults = json.loads(json.dumps(self.fingerprint_defaults))
        if without_defaults(json.loads(state["fingerprint"]), defaults) != without_defaults(as_saved, defaults):
            raise ValueError(
                f"checkpoint {path} was written by another configuration; use a new output_dir or train.resume=false\n"
                f"  checkpoint: {state['fingerprint']}\n  this run:   {json.dumps(self.fingerprint, sort_keys=True)}")
        self.unwrapped.load_state_dict(state["model"])
        if getattr(self.unwrapped, "bank_shard_pending", False):
            part = self.ckpt.shard_path(state["global_step"], rank(), self.acc.num_processes)
            if not part.is_file():
                raise CheckpointError(f"checkpoint {path} holds a sharded bank but {part}, this process's rows, "
                                      "is missing")
            self.unwrapped.load_bank_shard(checkpoints.load(part))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        self.epoch, self.micro_step, self.global_step = state["epoch"], state["micro_step"], state["global_step"]
        self.history = json.loads(state.get("history", "[]"))
        checkpoints.set_rng_state(state["rng"])
        self._saved_step = self.global_step
        logger.info("resumed from %s at step %d (epoch %d)", path, self.global_step, self.epoch)

    # ------------------------------------------------------------------ logs
    def _log(self, record: dict[str, float]) -> None:
        self.history.append(record)
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        self._tb.add_scalar(key, value, record["step"])

    def _trim_log(self) -> None:
        """Drop records logged after the resumed checkpoint (and torn lines), so the log reads as one run."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept, dropped, torn = [], 0, 0
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                torn += 1
                continue
            if record.get("step", 0) <= self.global_step:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped or torn:
            checkpoints.atomic_write(path, lambda f: f.write("".join(kept).encode()))
            logger.info("%s: dropped %d records logged after step %d and %d torn lines", path, dropped,
                        self.global_step, torn)

    def _open_tensorboard(self, resumed: bool):
        if not self.acc.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed (pip install 'mochi-retrieval[tensorboard]'); "
                           "scalars go to metrics.jsonl only")
            return None
        # purge_step: events at or after it, written before an interruption, are dropped.
        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.global_step + 1 if resumed else None)

    # ------------------------------------------------------------------ loop
    def _done(self) -> bool:
        return self.epoch >= self.s.epochs or (self.s.max_steps is not None and self.global_step >= self.s.max_steps)

    def fit(self) -> list[dict[str, float]]:
        """Train until ``epochs`` or ``max_steps``; returns the logged records.

        Raises:
            TrainingInterrupted: SIGTERM or SIGUSR1 arrived; a checkpoint of the step reached was written.
            CollectiveFailure: another process failed or hung (under several processes).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.maybe_resume()
        if self.acc.is_main_process:
            if resumed:
                self._trim_log()
            else:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
        self._tb = self._open_tensorboard(resumed)
        self._saved_at = time.monotonic()
        bar = tqdm(total=self.total_steps if self.s.max_steps is None else min(self.total_steps, self.s.max_steps),
                   initial=self.global_step, disable=not self.acc.is_main_process, desc="train", dynamic_ncols=True)
        window: dict[str, list[torch.Tensor]] = {}
        try:
            with self._signals:
                while not self._done():
                    self._run_epoch(bar, window)
        except RuntimeError as err:
            if self.acc.num_processes > 1 and is_collective_failure(err):
                raise self._collective_failure(err) from err
            raise
        finally:
            bar.close()
            if self._tb is not None:
                self._tb.close()
        return self.history

    def _collective_failure(self, err: RuntimeError) -> CollectiveFailure:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return CollectiveFailure(
            f"process {rank()} of {self.acc.num_processes}: a collective operation failed after step "
            f"{self.global_step}: {first}. Another process has probably failed or stopped responding (see its "
            "log); a hung one is given up on after the process-group timeout")

    def _poll(self) -> tuple[bool, bool]:
        """(stop, checkpoint due) after an optimiser step, the same on every process."""
        stop = self._signals.received is not None
        minutes = self.s.checkpoint_every_minutes
        timed = minutes is not None and time.monotonic() - self._saved_at >= 60.0 * minutes
        if self.acc.num_processes > 1:
            stop, timed = any_process([stop, timed], self.acc.device)
        every = self.s.checkpoint_every_steps
        due = timed or (every is not None and self.global_step % every == 0)
        if stop:
            logger.warning("%s received: stopping after step %d with a checkpoint", self._stop_reason(),
                           self.global_step)
        return stop, due

    def _stop_reason(self) -> str:
        received = self._signals.received
        return signal.Signals(received).name if received is not None else "another process's stop signal"

    def _interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(self._stop_reason(), self.global_step, self.ckpt.step_path(self.global_step))

    def _run_epoch(self, bar, window: dict[str, list[torch.Tensor]]) -> None:
        self.model.train()
        start = time.perf_counter()
        stop = due = False
        for batch in self.data.epoch(self.epoch, self.micro_step):
            if not self._micro_step(batch, bar, window):
                continue
            stop, due = self._poll()
            if stop or self.micro_step >= self.micro_per_epoch or self._done():
                break
            if due:
                self.save()
        if self.micro_step >= self.micro_per_epoch:
            self._end_epoch(start, run_hook=not stop)
            due = due or self.epoch % self.s.checkpoint_every_epochs == 0
        if due or stop or self._done():
            self.save()
        if stop:
            raise self._interrupted()

    def _micro_step(self, batch, bar, window: dict[str, list[torch.Tensor]]) -> bool:
        """Forward and backward one micro-batch; returns whether it completed an optimiser step."""
        frac_epoch = self.epoch + self.micro_step / self.micro_per_epoch
        with self.acc.accumulate(self.model):
            out = self.model(**batch, epoch=frac_epoch, step=self.epoch * self.micro_per_epoch + self.micro_step)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {self.global_step} (epoch {frac_epoch:.2f}); "
                    f"the last good checkpoint is {self.checkpoint_path()}")
            self.acc.backward(loss)
            if self.s.max_grad_norm is not None and self.acc.sync_gradients:
                self.acc.clip_grad_norm_(self.model.parameters(), self.s.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_step += 1
        for key in ("loss", "accuracy"):  # tensors: no device sync until logged
            window.setdefault(key, []).append(out[key].detach())
        for key, value in out.get("monitors", {}).items():  # per-step scalars a model reports
            window.setdefault(key, []).append(value.detach().float())
        if self.micro_step % self.s.grad_accum_steps:
            return False
        self.scheduler.step()
        self.global_step += 1
        bar.update(1)
        record = self._maybe_log(batch, out, window)
        if record is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}")
        return True

    def _end_epoch(self, start: float, run_hook: bool) -> None:
        logger.info("epoch %d took %.1f s", self.epoch, time.perf_counter() - start)
        self.epoch, self.micro_step = self.epoch + 1, 0
        if self.epoch_hook is None or not self.acc.is_main_process:
            return
        if not run_hook:
            logger.warning("stopping: the epoch hook (kNN monitor) of epoch %d is skipped", self.epoch)
            return
        self._log({"step": self.global_step, "epoch": self.epoch, **self.epoch_hook(self.epoch)})

    def _maybe_log(self, batch, out, window: dict[str, list[torch.Tensor]]) -> dict[str, float] | None:
        """Log the window's means (and diagnostics) at logging steps; returns the record, or None."""
        step = self.global_step
        diag = self.step_hook is not None and step % self.s.diagnostics_every == 0
        last = step >= self.total_steps or (self.s.max_steps is not None and step >= self.s.max_steps)
        if step % self.s.log_every and not diag and not last:
            return None
        record: dict[str, float] = {"step": step, "epoch": self.epoch + self.micro_step / self.micro_per_epoch,
                                    "lr": self.scheduler.get_last_lr()[0]}
        record.update({k: torch.stack(v).float().mean().item() for k, v in window.items()})
        window.clear()
        if diag and self.acc.is_main_process:
            record.update(self.step_hook(step, batch, out))
        self._log(record)
        return record


def without_defaults(found: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``found`` without the entries equal to ``defaults`` (section by section, one level down): what a
    checkpoint's fingerprint and a run's must agree on."""
    out = {}
    for key, value in found.items():
        default = defaults.get(key, _ABSENT)
        if isinstance(value, dict) and isinstance(default, dict):
            kept = {k: v for k, v in value.items() if default.get(k, _ABSENT) != v}
            if kept:
                out[key] = kept
        elif value != default:
            out[key] = value
    return out


_ABSENT = object()
