"""Forward+backward cost of the MoCHi head against the plain MoCo head.

Paper scale by default: B=256, K=65,536, D=128, MoCHi(1024, 512, 256). Four heads
on the same inputs, timed round-robin in one run (median of repeats):

- plain: MoCo-v2 InfoNCE over the queue;
- closed: MoCHi through ``contrastive_loss`` (closed-form synthetic logits);
- materialised: MoCHi building the (B, s+s', D) synthetic points;
- loop: a straightforward per-query loop (topk, mixing, logits per query).

Peak memory is measured per head in a fresh subprocess (growth of the RSS
high-water mark on the CPU, Linux only; ``max_memory_allocated`` on a GPU).

    python benchmarks/mixing_overhead.py [--device cuda] [--repeats 7]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
import torch.nn.functional as F
from common import append_results, interleaved_medians, markdown_table, status_kib

from mochi_retrieval.loss import MoCHiConfig, contrastive_loss, info_nce_from_logits
from mochi_retrieval.mixing import sample_plan, synthesize

T = 0.2


def make_inputs(args, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1).to(device).requires_grad_(True)
    k = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1).to(device)
    queue = F.normalize(torch.randn(args.queue, args.dim, generator=g), dim=1).to(device)
    return q, k, queue


def make_heads(args, q, k, queue):
    mochi = MoCHiConfig(args.n_hard, args.n_mix, args.n_query_mix)

    def plain():
        contrastive_loss(q, k, queue, T).loss.backward()

    def closed():
        contrastive_loss(q, k, queue, T, mochi=mochi).loss.backward()

    def materialised():
        neg = q @ queue.t()
        plan = sample_plan(neg, args.n_hard, args.n_mix, args.n_query_mix)
        synth = torch.einsum("bd,bsd->bs", q, synthesize(q, queue, plan))
        info_nce_from_logits((q * k).sum(1), neg, T, synth).backward()

    def loop():
        losses = []
        for b in range(q.shape[0]):
            neg = queue @ q[b]
            pool = queue[torch.topk(neg.detach(), args.n_hard).indices]
            i = torch.randint(0, args.n_hard, (args.n_mix,), device=q.device)
            j = torch.randint(0, args.n_hard, (args.n_mix,), device=q.device)
            a = torch.rand(args.n_mix, 1, device=q.device)
            h = F.normalize(a * pool[i] + (1 - a) * pool[j], dim=1)
            jq = torch.randint(0, args.n_hard, (args.n_query_mix,), device=q.device)
            beta = torch.rand(args.n_query_mix, 1, device=q.device) * 0.5
            hq = F.normalize(beta * q[b].detach() + (1 - beta) * pool[jq], dim=1)
            logits = torch.cat([(q[b] * k[b]).sum().view(1), neg, h @ q[b], hq @ q[b]]) / T
            losses.append(torch.logsumexp(logits, 0) - logits[0])
        torch.stack(losses).mean().backward()

    return {"plain": plain, "closed": closed, "materialised": materialised, "loop": loop}


def _peak_worker(args, name, device, out):
    torch.set_num_threads(args.threads or torch.get_num_threads())
    q, k, queue = make_inputs(args, device)
    head = make_heads(args, q, k, queue)[name]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        head()
        out.put((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    else:
        # ru_maxrss survives fork+exec, so reset the high-water mark instead.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS")
        head()
        out.put((status_kib("VmHWM") - before) / 1024)


def peak_mib(args, name, device) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_peak_worker, args=(args, name, device, out))
    p.start()
    value = out.get()
    p.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n-hard", type=int, default=1024)
    parser.add_argument("--n-mix", type=int, default=512)
    parser.add_argument("--n-query-mix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loop-repeats", type=int, default=2, help="the per-query loop is slow")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    q, k, queue = make_inputs(args, device)
    heads = make_heads(args, q, k, queue)
    loop = heads.pop("loop")
    times = interleaved_medians(heads, args.repeats, device)
    times.update(interleaved_medians({"loop": loop}, args.loop_repeats, device))
    rows = []
    for name in ("plain", "closed", "materialised", "loop"):
        mem = peak_mib(args, name, device)
        rows.append([name, f"{times[name] * 1e3:.1f}", f"{times[name] / times['plain']:.2f}x", f"{mem:.0f}"])
    table = markdown_table(["head", "fwd+bwd ms (median)", "vs plain", "peak MiB"], rows)
    print(table)
    if not args.no_write:
        scale = (f"B={args.batch}, K={args.queue}, D={args.dim}, "
                 f"MoCHi({args.n_hard}, {args.n_mix}, {args.n_query_mix}), {args.repeats} repeats")
        append_results(f"mixing_overhead ({device.type})", f"{scale}\n\n{table}")


if __name__ == "__main__":
    main()
