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


def outage_intervals(rows: list[dict]) -> list[tuple[float, float]]:
    """``(first, last)`` env steps of each run of rows in which the annotator was down.

    A row reports the state at its end; an outage is drawn from the row before its first down
    row (the last step known to be up) to its last down row.
    """
    spans: list[tuple[float, float]] = []
    start = end = previous = None
    for row in rows:
        steps = row.get("env_steps")
        if steps is None:
            continue
        if row.get("annotator_up") == 0:
            if start is None:
                start = previous if previous is not None else steps
            end = steps
        elif start is not None:
            spans.append((start, end))
            start = None
        previous = steps
    if start is not None:
        spans.append((start, end))
    return spans


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
    outages = outage_intervals(rows)
    for ax, (key, title) in zip(axes, PANELS):
        for i, (start, end) in enumerate(outages):
            ax.axvspan(
                start,
                end,
                color="tab:red",
                alpha=0.15,
                lw=0,
                label="annotator down" if i == 0 else None,
            )
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
        if outages:
            ax.legend(loc="upper left", fontsize=7)
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
