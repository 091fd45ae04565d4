"""Split BatchNorm (one pass of the network, BatchNorm statistics per sub-batch) against a pass per
sub-batch, on the Fashion-MNIST CPU config's training step (``model.bn_splits`` sub-batches).

Both models start from the same weights and take the same batches; the first steps' losses are printed
(they agree to float rounding), then the step times are measured interleaved (median).

    python benchmarks/studies/split_bn.py [--steps 20] [--threads 2] [overrides ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, fashion_mnist

import torch  # noqa: E402
from common import OneCpuProcess, append_results, interleaved_medians, markdown_table  # noqa: E402

from mochi_retrieval.config import load_config  # noqa: E402
from mochi_retrieval.encoders.split_bn import convert_split_batchnorm  # noqa: E402
from mochi_retrieval.training import build_data, build_model  # noqa: E402

CONFIG = "configs/fashion_mnist_resnet18.yaml"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. mochi.enabled=false")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, ["mochi.warmup_epochs=0", *args.overrides])
    if cfg.model.bn_splits < 2:
        raise SystemExit(f"model.bn_splits is {cfg.model.bn_splits}: nothing to split")
    data = build_data(cfg, OneCpuProcess())
    batches = [b for _, b in zip(range(10), data.epoch(0))]
    runs = {}
    for name in ("pass per sub-batch", "split BatchNorm"):
        torch.manual_seed(0)
        model = build_model(cfg, data.steps_per_epoch, 1)
        if name == "pass per sub-batch":  # plain BatchNorm, the network run on each sub-batch in turn
            convert_split_batchnorm(model, 1)
            model._split_in_bn = False
        opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=cfg.train.lr, momentum=0.9)
        runs[name] = [model, opt, 0, []]

    def step(name: str):
        def run() -> None:
            r = runs[name]
            model, opt = r[0], r[1]
            out = model(**batches[r[2] % len(batches)], epoch=1.0, step=r[2])
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            r[2] += 1
            r[3].append(out["loss"].item())
        return run

    times = interleaved_medians({name: step(name) for name in runs}, args.steps, torch.device("cpu"))
    slow, fast = times["pass per sub-batch"], times["split BatchNorm"]
    rows = [[name, f"{1000 * t:.1f}", " ".join(f"{v:.5f}" for v in runs[name][3][:3])] for name, t in times.items()]
    body = (f"{args.steps} interleaved steps each, {args.threads} threads, bn_splits {cfg.model.bn_splits}, batch "
            f"{cfg.train.batch_size}, MoCHi {'on' if cfg.mochi.enabled else 'off'}\n\n"
            + markdown_table(["path", "step ms (median)", "losses of the first 3 steps"], rows)
            + f"\n\nspeed-up of the split BatchNorm: {slow / fast:.2f}x")
    print(body)
    if not args.no_write:
        append_results("split BatchNorm vs a pass per sub-batch", body)


if __name__ == "__main__":
    main()
