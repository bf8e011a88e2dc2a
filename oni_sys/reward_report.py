"""What ``oni-sys rewards RUN [--top N]`` prints: the captions that earned the most intrinsic
reward in a run, with their sightings, label and current reward.

It reads ``intrinsic_rewards.json``, which the runtime writes atomically into the run directory
with every metrics row and checkpoint, and the run's label store; no model is loaded, so it
works on a running run as well as a finished one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: per-caption intrinsic reward of a run, in the run directory
REWARD_TABLE = "intrinsic_rewards.json"
_TEXT_WIDTH = 100


def read_reward_table(run_dir: str | Path) -> dict[str, Any]:
    """The run's table; ``ValueError`` (one sentence) for a missing run or table."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    path = run_dir / REWARD_TABLE
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no {REWARD_TABLE} (it is written with the first metrics row or "
            "checkpoint of a run whose reward.kind is not none)"
        )
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable reward table ({exc})") from None
    if not isinstance(table, dict) or not isinstance(table.get("captions"), list):
        raise ValueError(f"{path}: not a reward table (no captions list)")
    return table


def _store_path(run_dir: Path) -> Path:
    """``annotator.store`` of the run's config, or ``labels.sqlite`` in the run directory."""
    import yaml

    store = None
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        store = (cfg.get("annotator") or {}).get("store")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return Path(store) if store else run_dir / "labels.sqlite"


def _labels(
    store_path: Path, wanted: str | None, ids: list[int]
) -> tuple[dict[int, int | None], str]:
    """Labels of ``ids`` (None: unlabelable) and a line saying where they come from."""
    from oni_sys.annotators.annotation_store import AnnotationStore

    if not store_path.is_file():
        return {}, f"labels: no label store at {store_path}"
    try:
        with AnnotationStore(store_path, create=False) as store:
            versions = store.versions()
            version = wanted if wanted in versions else (versions[-1] if versions else None)
            if version is None:
                return {}, f"labels: {store_path} holds no labels yet"
            stored = store.get_labels(version, ids)
    except ValueError as exc:
        return {}, f"labels: unavailable ({exc})"
    return (
        {cid: rec.label for cid, rec in stored.items()},
        f"labels: {store_path}, annotator version {version}",
    )


def _one_line(text: str | None) -> str:
    if text is None:
        return "(text not received)"
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_WIDTH else text[: _TEXT_WIDTH - 3] + "..."


def _amount(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4g}"


def _pct(part: float, total: float) -> str:
    return f"{100 * part / total:.1f}%" if total > 0 else "-"


def rewards_report(run_dir: str | Path, top: int = 20) -> str:
    """The text of ``oni-sys rewards``: the ``top`` captions by intrinsic reward paid."""
    run_dir = Path(run_dir)
    table = read_reward_table(run_dir)
    rows = table["captions"][:top]
    labels, label_line = _labels(
        _store_path(run_dir), table.get("annotator_version"), [int(r["id"]) for r in rows]
    )
    paid_total = float(table.get("paid_total") or 0.0)
    window_total = float(table.get("window_paid_total") or 0.0)
    out = [
        f"run: {run_dir} (env steps {table.get('env_steps')}, updates {table.get('updates')})",
        f"reward: kind={table.get('reward_kind')} c_int={table.get('c_int')} "
        f"beta={table.get('beta')}, snapshot version {table.get('snapshot_version')}; a "
        "sighting pays c_int * r_int / N_episode^beta",
        f"intrinsic reward paid: {_amount(paid_total)} over {table.get('captions_total')} captions "
        "seen",
        f"last {table.get('window_batches')} updates: the top caption earned "
        f"{_pct(float(table.get('window_top_share') or 0.0), 1.0)} of {_amount(window_total)}",
        label_line,
        "",
        f"{'rank':>4}  {'paid':>10}  {'share':>6}  {'window':>6}  {'sightings':>10}  "
        f"{'r_int':>6}  {'label':>5}  caption",
    ]
    for rank, row in enumerate(rows, start=1):
        cid = int(row["id"])
        label = labels.get(cid, "-") if cid in labels else "-"
        label = "?" if cid in labels and label is None else label
        r_int = row.get("r_int")
        r_txt = "-" if r_int is None or not math.isfinite(r_int) else f"{r_int:.3f}"
        out.append(
            f"{rank:>4}  {_amount(row['paid']):>10}  {_pct(row['paid'], paid_total):>6}  "
            f"{_pct(row.get('window_paid', 0.0), window_total):>6}  {row['sightings']:>10}  "
            f"{r_txt:>6}  {label!s:>5}  {_one_line(row.get('text'))}"
        )
    if not rows:
        out.append("(no caption seen yet)")
    return "\n".join(out) + "\n"
