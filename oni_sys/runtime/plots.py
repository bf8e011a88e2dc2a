"""``curves.png`` of a run: extrinsic return, intrinsic return and labels over env steps."""

from __future__ import annotations

import logging
from pathlib import Path

from oni_sys.runtime.run_dir import read_metrics

logger = logging.getLogger(__name__)

PANELS = (
    ("episode_return_mean", "extrinsic return (mean of recent episodes)"),
    ("intrinsic_return_mean", "intrinsic return (mean of recent episodes)"),
    ("labels_total", "LLM labels"),
)


def write_curves(run_dir: str | Path) -> Path | None:
    """Plot the run's metrics into ``<run_dir>/curves.png`` (atomically); None if matplotlib is
    missing (``pip install 'oni-sys[plots]'``) or there is nothing to plot."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("curves.png skipped: matplotlib is missing (pip install 'oni-sys[plots]')")
        return None
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(7, 2.4 * len(PANELS)), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        points = [(r["env_steps"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys)
        else:
            ax.text(
                0.5,
                0.5,
                "not recorded in this run",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("env steps")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    target = run_dir / "curves.png"
    tmp = run_dir / ".curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(target)
    return target
