"""The training program end to end on tiny data: run, resume, bad input, two processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import device_checks
import pytest
import torch
from device_checks import DEVICES

from mochi_retrieval import train

CONFIG = Path(__file__).parents[1] / "configs" / "fashion_mnist_resnet18.yaml"


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    base = {
        "output_dir": str(out), "data.root": str(data), "model.encoder_kwargs.width": 8,
        "model.head_hidden_dim": 32, "model.head_out_dim": 16, "moco.queue_size": 64,
        "mochi.n_hard": 16, "mochi.n_mix": 8, "mochi.n_query_mix": 4, "mochi.warmup_epochs": 0.5,
        "train.batch_size": 32, "train.epochs": 2, "train.log_every": 1, "train.diagnostics_every": 2,
        "eval.knn_k": 10, "eval.knn_train_limit": 96,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_end_to_end_writes_everything(tiny_fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out)]) == 0
    printed = capsys.readouterr().out
    assert "knn_top1" in printed and "linear_top1" in printed
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["knn_top1"] <= 1.0 and results["steps"] == 12  # 2 epochs of 192 // 32
    for name in ("config.yaml", "encoder.pt", "curves.png", "checkpoints/last.pt", "metrics.jsonl"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_monitor" in r for r in records)
    diag = [r for r in records if "false_neg_hard_pool" in r]
    assert diag and all(0.0 <= r["false_neg_hard_pool"] <= 1.0 for r in diag)
    assert any("false_neg_synthetic_sources" in r for r in records), "MoCHi should be on after its warm-up"
    # The exported encoder is what the eval CLI loads.
    from mochi_retrieval.eval.models import load_model

    assert load_model(out).modality == "image"


# Also with a label-free false-negative handling on from mid-run (attraction: extra positives, support views).
@pytest.mark.parametrize("extra", [{}, {"false_negatives.handling": "attract", "false_negatives.start_epoch": 0.5,
                                        "false_negatives.top_k": 4, "false_negatives.support_views": 1,
                                        "mochi.warmup_epochs": 0}],
                         ids=["plain", "fn_attract"])
def test_resume_matches_uninterrupted_run(tiny_fmnist_dir, tmp_path, extra):
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = {"eval.linear_probe": "false", "train.epochs": 2, **extra}
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, full, **common)]) == 0
    # Stop mid-epoch (step 4 of 6 in epoch 0), then resume to the end.
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, cut, **common, **{"train.max_steps": 4})]) == 0
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, cut, **common)]) == 0
    a, b = losses(full), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    qa = torch.load(full / "checkpoints/last.pt", weights_only=True)["model"]["queue.keys"]
    qb = torch.load(cut / "checkpoints/last.pt", weights_only=True)["model"]["queue.keys"]
    torch.testing.assert_close(qa, qb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"train.lrr": 0.1}, "did you mean 'train.lr'"),
        ({"moco.queue_size": 8}, "n_hard"),
        ({"moco.queue_size": 16, "mochi.n_hard": 4, "mochi.n_mix": 2}, "does not fit the queue"),
        ({"data.root": "/nonexistent/fmnist"}, "apt-get install dataset-fashion-mnist"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_fmnist_dir, tmp_path, capsys, extra, message):
    code = train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, tmp_path / "r", **extra)])
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_checkpoint_of_another_config_is_refused(tiny_fmnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    short = {"train.max_steps": 1, "eval.linear_probe": "false"}
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **short)]) == 0
    code = train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **short, **{"moco.temperature": 0.5})])
    assert code == 1 and "another configuration" in capsys.readouterr().err


def test_a_checkpoint_from_before_a_setting_existed_resumes_while_the_run_keeps_its_default(
        tiny_fmnist_dir, tmp_path, capsys, caplog):
    """A library update adds settings (bank.rerank, bank.rows_dir here): a checkpoint whose fingerprint lacks
    them resumes when the run leaves them at their defaults, and is refused when it sets one."""
    out = tmp_path / "run"
    short = {"eval.linear_probe": "false", "train.checkpoint_every_steps": 1}
    assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **short, **{"train.max_steps": 1})]) == 0
    path = out / "checkpoints" / "step-00000001.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    older = json.loads(state["fingerprint"])
    for key in ("rerank", "rows_dir"):
        del older["bank"][key]
    state["fingerprint"] = json.dumps(older, sort_keys=True)
    torch.save(state, path)
    refused = train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **short,
                                                       **{"train.max_steps": 2, "bank.rows_dir": str(tmp_path)})])
    assert refused == 1 and "another configuration" in capsys.readouterr().err
    with caplog.at_level("INFO"):
        assert train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **short,
                                                        **{"train.max_steps": 2})]) == 0
    assert "resum" in caplog.text.lower() and "step-00000001.pt" in caplog.text


class NaNAfter(torch.nn.Module):
    """A tiny encoder whose output turns NaN once it has run ``calls`` training forwards."""

    output_dim = 8

    def __init__(self, calls: int = 8) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)  # grey input: evaluation feeds 1 channel
        self.proj = torch.nn.Linear(28 * 28, 8)
        self.calls, self.seen = calls, 0

    def forward(self, x):
        out = self.proj(self.conv(x).flatten(1))
        if self.training:
            self.seen += 1
            if self.seen > self.calls:
                out = out * float("nan")
        return out


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_fmnist_dir, tmp_path, capsys):
    from mochi_retrieval.encoders import register_encoder

    register_encoder("test_nan_after", NaNAfter, override=True)
    out = tmp_path / "run"
    # 6 steps per epoch; the encoder breaks at step 9, after the epoch-1 checkpoint. It counts forward calls:
    # one per step needs one BatchNorm group (the config's bn_splits would call it once per group).
    args = tiny_overrides(tiny_fmnist_dir, out, **{"model.encoder": "test_nan_after", "model.encoder_kwargs": "{}",
                                                   "eval.linear_probe": "false", "train.epochs": 3,
                                                   "model.bn_splits": 1})
    assert train.main([str(CONFIG), *args]) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 8" in err and "Traceback" not in err
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["global_step"] == 6 and state["epoch"] == 1


def test_two_processes_keep_identical_queues(tiny_fmnist_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "mochi_retrieval.train", str(CONFIG),
           *tiny_overrides(tiny_fmnist_dir, out, **{"eval.linear_probe": "false", "train.epochs": 1})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicas agree on 5 tensors across 2 processes" in proc.stderr
    assert proc.stdout.count("knn_top1") == 1  # results printed by the main process only
    assert (out / "checkpoints/last.pt").is_file()


def test_a_launched_process_exits_with_its_code_and_everything_flushed(tmp_path):
    """exit_launched_process: under a launcher (WORLD_SIZE > 1) it skips the interpreter's teardown, so it
    must flush what the program printed and logged first, and keep the exit code; alone it is sys.exit."""
    script = ("import logging, sys\n"
              "logging.basicConfig(filename=sys.argv[1], level=logging.INFO)\n"
              "logging.getLogger('x').info('logged line')\n"
              "print('printed line', end='')\n"
              "print('to stderr', end='', file=sys.stderr)\n"
              "from mochi_retrieval.distributed import exit_launched_process\n"
              "exit_launched_process(3)\n")
    for world in ("1", "2"):
        log = tmp_path / f"world{world}.log"
        env = {**os.environ, "WORLD_SIZE": world}
        proc = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True, text=True, env=env,
                              timeout=120)
        assert (proc.returncode, proc.stdout, proc.stderr[-9:]) == (3, "printed line", "to stderr"), world
        assert "logged line" in log.read_text()


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 16) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
                pixels[:, :, c] += 150  # class = dominant colour channel
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_training_runs(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "run"
    args = tiny_overrides(root, out, **{
        "data.dataset": "imagefolder", "data.image_size": 32, "data.augmentation": "mocov2",
        "data.num_workers": 0, "model.encoder_kwargs": "{width: 8, small_images: true}",
        "train.batch_size": 8, "train.epochs": 1, "eval.linear_probe": "false"})
    assert train.main([str(CONFIG), *args]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 4  # 32 images // 8


def test_missing_or_empty_image_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    for root, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "holds no class folders")):
        args = tiny_overrides(root, tmp_path / "run", **{"data.dataset": "imagefolder", "data.num_workers": 0})
        assert train.main([str(CONFIG), *args]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_class_list_restricts_training_and_evaluation_classes(tmp_path):
    from mochi_retrieval.data.images import image_folder
    from mochi_retrieval.encoders import create_encoder
    from mochi_retrieval.eval.features import load_classification_data

    root = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    keep = ["a", "c"]
    assert image_folder(str(root / "train"), keep).classes == keep
    train_set, test_set, n_classes = load_classification_data(root, create_encoder("resnet18", width=8), 32,
                                                              class_list=keep)
    assert n_classes == 2 and len(train_set) == len(test_set) == 4
    with pytest.raises(FileNotFoundError, match="missing"):
        image_folder(str(root / "train"), ["a", "zebra"])


def test_bf16_mixed_precision_runs_on_cpu(tiny_fmnist_dir, tmp_path):
    out = tmp_path / "bf16"
    args = tiny_overrides(tiny_fmnist_dir, out, **{"train.mixed_precision": "bf16", "train.epochs": 1,
                                                   "eval.linear_probe": "false"})
    assert train.main([str(CONFIG), *args]) == 0
    assert all(v == v for v in losses(out).values())  # finite, not NaN


def test_gradient_accumulation_counts_optimiser_steps(tiny_fmnist_dir, tmp_path):
    out = tmp_path / "accum"
    args = tiny_overrides(tiny_fmnist_dir, out, **{"train.grad_accum_steps": 2, "train.epochs": 1,
                                                   "eval.linear_probe": "false"})
    assert train.main([str(CONFIG), *args]) == 0
    # 192 images, global batch 32 as 2 micro-batches of 16: 6 optimiser steps.
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    assert sorted(losses(out)) == list(range(1, 7))


def test_image_bank_end_to_end(tiny_fmnist_dir, tmp_path):
    """bank.enabled on an image config: a bank over the training items, filled with each batch's keys."""
    out = tmp_path / "bank"
    code = train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **{
        "bank.enabled": "true", "bank.candidates": 8, "mochi.warmup_epochs": 0, "train.epochs": 1})])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("false_neg_hard_pool" in r for r in records)  # diagnostics read the per-query labels
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)


def test_image_bank_unit_candidates_and_updates():
    from mochi_retrieval.bank import BankSettings
    from mochi_retrieval.encoders import create_encoder
    from mochi_retrieval.moco import MoCo

    torch.manual_seed(0)
    labels = torch.arange(20) % 4
    model = MoCo(create_encoder("resnet18", in_channels=1, width=8), head_hidden_dim=16, head_out_dim=8,
                 queue_size=16, bank=BankSettings(candidates=5, backend="torch", device="cpu"),
                 bank_labels=labels, mask_same_label=True)
    x = torch.rand(6, 1, 32, 32)
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    out = model(x, x.flip(-1), ids=ids, labels=labels[ids], step=0)
    assert out["neg_logits"].shape == (6, 16 + 5)
    torch.testing.assert_close(model.bank.embeddings[ids], out["k"])  # written in place
    # Candidates never hold the query's own item nor (mask_same_label) its class.
    cand_ids, _ = model.bank.candidates(out["q"], 5, exclude=ids.view(-1, 1), exclude_text_dupes=True)
    assert not (cand_ids == ids.view(-1, 1)).any() and not (labels[cand_ids] == labels[ids].view(-1, 1)).any()
    with pytest.raises(ValueError, match="bank_labels"):
        MoCo(create_encoder("resnet18", in_channels=1, width=8), head_hidden_dim=16, head_out_dim=8,
             queue_size=16, bank=BankSettings(candidates=5))


def test_param_groups_exclude_1d_from_weight_decay_on_request():
    from mochi_retrieval.training import TrainerSettings, make_optimizer, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert len(param_groups(model, TrainerSettings())) == 1
    groups = param_groups(model, TrainerSettings(weight_decay_1d=False))
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[1]["weight_decay"] == 0.0
    opt = make_optimizer(groups, TrainerSettings(optimizer="adamw", weight_decay=0.01, weight_decay_1d=False))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_gradient_clipping_caps_the_update(tiny_fmnist_dir, tmp_path):
    """With a tiny max_grad_norm the first SGD step (no momentum yet) moves the weights by lr * max_norm at most."""
    out = tmp_path / "clip"
    code = train.main([str(CONFIG), *tiny_overrides(tiny_fmnist_dir, out, **{
        "train.max_grad_norm": 1e-3, "train.max_steps": 1, "train.weight_decay": 0, "train.warmup_epochs": 0,
        "eval.linear_probe": "false"})])
    assert code == 0
    from mochi_retrieval.config import load_config
    from mochi_retrieval.training import build_model

    cfg = load_config(CONFIG, tiny_overrides(tiny_fmnist_dir, out))
    torch.manual_seed(cfg.seed)
    start = build_model(cfg, 6, 1).query_net.state_dict()
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    moved = torch.cat([(state[f"query_net.{k}"] - v).flatten().float() for k, v in start.items()
                       if v.dtype.is_floating_point and "running" not in k])
    assert 0 < moved.norm() <= 0.06 * 1e-3 * 1.0001


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_is_finite_and_close_to_fp32(device):
    """One MoCo-v2 + MoCHi step under bf16 autocast, channels-last, against the same step in fp32."""
    device_checks.check_bf16_moco_step(device)
