"""Draw the concept figures of docs/concepts.md into docs/img/ (small PNGs, committed).

    python docs/figures.py
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("img")
BLUE, ORANGE, GREEN, GREY, RED = "#3f51b5", "#ef6c00", "#2e7d32", "#9e9e9e", "#c62828"


def box(ax, x, y, w, h, text, color=BLUE, fill="white", size=9.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.05", ec=color, fc=fill,
                                lw=1.5))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color="black")


def arrow(ax, a, b, color="black", text=None, style="-|>", ls="-", offset=(0, 0.08)):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, color=color, lw=1.3, ls=ls))
    if text:
        ax.text((a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1], text, ha="center", fontsize=8.5,
                color=color)


def canvas(w=8.0, h=3.2, xlim=(0, 10), ylim=(0, 4)):
    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    ax.set_xlim(*xlim), ax.set_ylim(*ylim), ax.axis("off")
    return fig, ax


def save(fig, name):
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / name, bbox_inches="tight", pad_inches=0.05, dpi=110)
    plt.close(fig)


def queue_figure():
    fig, ax = canvas(ylim=(0, 4.2))
    box(ax, 0.1, 2.8, 1.6, 0.8, "view 1\n(query image)", GREY)
    box(ax, 0.1, 0.6, 1.6, 0.8, "view 2\n(key image)", GREY)
    box(ax, 2.1, 2.8, 2.2, 0.8, "query encoder\n+ head", BLUE)
    box(ax, 2.1, 0.6, 2.2, 0.8, "key encoder + head\n(momentum copy)", ORANGE, size=8.5)
    arrow(ax, (1.7, 3.2), (2.1, 3.2)), arrow(ax, (1.7, 1.0), (2.1, 1.0))
    arrow(ax, (2.6, 2.8), (2.6, 1.4), ORANGE, "EMA\nm = 0.999", ls="--", offset=(-0.35, -0.1))
    for i in range(8):  # the queue's slots, oldest on the right
        ax.add_patch(plt.Rectangle((5.2 + i * 0.45, 0.65), 0.4, 0.7, fc="#ffe0b2" if i else "#ffcc80", ec=ORANGE))
    ax.text(7.0, 0.3, "queue of K keys (FIFO): this batch in, the oldest out", ha="center", fontsize=8.5)
    arrow(ax, (4.3, 1.0), (5.15, 1.0), ORANGE)
    ax.text(4.74, 0.68, "enqueue", ha="center", fontsize=8, color=ORANGE)
    box(ax, 5.2, 2.8, 4.6, 0.8, "logits [q·k, q·n₁ … q·n_K] / T\ncross-entropy, target 0", GREEN)
    arrow(ax, (4.3, 3.2), (5.2, 3.2), BLUE, "q")
    arrow(ax, (7.0, 1.4), (7.0, 2.8), ORANGE, "negatives n (no gradient)", offset=(1.1, 0))
    arrow(ax, (3.8, 1.4), (5.5, 2.8), ORANGE, "positive k", offset=(0.55, -0.2))
    save(fig, "queue.png")


def bank_figure():
    fig, ax = canvas(ylim=(0, 4.2))
    box(ax, 0.1, 2.9, 1.8, 0.8, "training\ndocuments", GREY)
    box(ax, 2.3, 2.9, 2.3, 0.8, "encoder in eval mode\n(every R steps)", BLUE, size=8.5)
    box(ax, 5.5, 2.9, 1.6, 0.8, "FAISS index\n(GPU or CPU)", ORANGE, size=9)
    arrow(ax, (1.9, 3.3), (2.3, 3.3)), arrow(ax, (4.6, 3.3), (5.5, 3.3), text="embed", offset=(0, 0.1))
    box(ax, 5.3, 1.2, 1.8, 0.8, "top candidates\nper query", ORANGE, size=9)
    arrow(ax, (6.2, 2.9), (6.2, 2.0), text="search q", offset=(0.45, 0))
    box(ax, 7.55, 2.2, 2.4, 0.8, "n mined: texts re-\nencoded, with gradient", GREEN, size=8)
    box(ax, 7.55, 0.6, 2.4, 0.8, "c detached:\nstored vectors", GREY, size=8)
    arrow(ax, (7.1, 1.7), (7.55, 2.5)), arrow(ax, (7.1, 1.5), (7.55, 1.0))
    ax.text(2.4, 1.45, "masked first: the query's positives,\ntheir duplicates (same tokens),\n"
            "scores above r × q·k (max_pos_ratio)", fontsize=8.5, ha="center", va="center", color=RED)
    save(fig, "bank.png")


def mixing_figure():
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=90)
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(t), np.sin(t), color=GREY, lw=0.8)
    angle = lambda d: np.array([np.cos(np.radians(d)), np.sin(np.radians(d))])  # noqa: E731
    q = angle(90)
    pool = [angle(d) for d in (25, 45, 125, 145)]
    others = [angle(d) for d in (-20, -60, -110, -150, 200, 180)]
    ax.scatter(*np.array(others).T, color=GREY, s=25, label="other queue entries")
    ax.scatter(*np.array(pool).T, color=ORANGE, s=40, label="hard pool (top-N by q·n)")
    ax.scatter(*q, color=BLUE, s=60, marker="*", zorder=5, label="query q")
    a, ni, nj = 0.65, pool[1], pool[3]
    h = a * ni + (1 - a) * nj
    h /= np.linalg.norm(h)
    ax.plot(*np.array([ni, nj]).T, color=GREEN, ls=":", lw=1)
    ax.scatter(*h, color=GREEN, s=45, marker="D", zorder=5, label="h = norm(a·nᵢ + (1−a)·nⱼ)")
    b, nk = 0.35, pool[2]
    hq = b * q + (1 - b) * nk
    hq /= np.linalg.norm(hq)
    ax.plot(*np.array([q, nk]).T, color=RED, ls=":", lw=1)
    ax.scatter(*hq, color=RED, s=45, marker="D", zorder=5, label="h′ = norm(b·q + (1−b)·nⱼ), b < 0.5")
    ax.set_aspect("equal"), ax.axis("off"), ax.set_xlim(-1.1, 1.1), ax.set_ylim(-1.1, 1.1)
    ax.legend(loc="center left", fontsize=9, frameon=False, bbox_to_anchor=(1.02, 0.5))
    save(fig, "mixing.png")


def gradient_figure():
    fig, ax = canvas(ylim=(0, 4.3))
    ax.text(0.1, 4.0, "moco.gradient: query_only (the default), a shared encoder", fontsize=10, weight="bold")
    box(ax, 0.1, 2.3, 3.4, 1.2, "term 1: q against every source\n(in-batch, mined, queue, bank,\n"
        "MoCHi), documents detached", BLUE, size=9)
    box(ax, 0.1, 0.4, 3.4, 1.2, "term 2: documents against q\n(in-batch and mined only),\nquery detached", GREEN,
        size=9)
    box(ax, 5.0, 2.5, 1.8, 0.8, "query\nembedding", BLUE)
    box(ax, 5.0, 0.6, 1.8, 0.8, "document\nembeddings", GREEN)
    arrow(ax, (3.5, 2.9), (5.0, 2.9), BLUE, "gradient")
    arrow(ax, (3.5, 1.0), (5.0, 1.0), GREEN, "gradient")
    ax.text(8.4, 2.9, "detached negatives\n(queue, bank vectors,\nMoCHi) sharpen q only", fontsize=8.5,
            ha="center", va="center")
    ax.text(8.4, 1.0, "the push on documents is\nMNRL's: no collapse\n(doc-doc cosine stays low)", fontsize=8.5,
            ha="center", va="center")
    save(fig, "gradient.png")


def false_negatives_figure():
    rows = [("MoCo-v2", 0.8254, 0.0021, GREY), ("MoCo-v2 + MoCHi", 0.8267, 0.0013, BLUE),
            ("MoCHi + FAISS bank", 0.8254, 0.0025, ORANGE), ("MoCo-v2, same class\nmasked (oracle)", 0.8473,
                                                             0.0038, GREY),
            ("MoCHi, same class\nmasked (oracle)", 0.8456, 0.0026, BLUE), ("MoCHi + bank, same\nclass masked",
                                                                          0.8486, 0.0008, ORANGE)]
    fig, ax = plt.subplots(figsize=(7.2, 3.0), dpi=90)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r[1] - 0.80 for r in rows], left=0.80, xerr=[r[2] for r in rows], color=[r[3] for r in rows],
            height=0.6, capsize=3)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8.5)
    ax.set_xlim(0.80, 0.855), ax.set_xlabel("Fashion-MNIST kNN top-1, mean ± sd over 3 seeds", fontsize=9)
    for yi, r in zip(y, rows):
        ax.text(r[1] + r[2] + 0.0008, yi, f"{r[1]:.4f}", va="center", fontsize=8)
    ax.axhline(2.5, color=GREY, lw=0.6, ls="--")
    ax.spines[["top", "right"]].set_visible(False)
    save(fig, "false_negatives.png")


if __name__ == "__main__":
    for draw in (queue_figure, bank_figure, mixing_figure, gradient_figure, false_negatives_figure):
        draw()
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))}")
