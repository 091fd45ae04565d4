"""PNG plots of training curves (matplotlib, imported where used)."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Curves worth a panel each, in display order, when they were logged.
PANELS = ("loss", "accuracy", "knn_monitor", "pos_sim", "hardest_neg_sim", "hard_pool_sim", "alignment",
          "uniformity", "false_neg_hard_pool", "false_neg_synthetic_sources", "doc_cosine", "mass_positive",
          "mass_in_batch", "mass_mined", "mass_queue", "mass_bank", "mass_synthetic", "grad_mass_share",
          "false_neg_family_top16", "lr")


def plot_history(history: list[dict[str, float]], path: str | Path) -> Path | None:
    """One small panel per logged scalar against the step; returns the path, or None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PANELS if any(k in r for r in history)]
    if not keys:
        return None
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in history if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    logger.info("training curves written to %s", path)
    return Path(path)
