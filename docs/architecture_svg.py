"""Draw the role graph of oni-sys as an SVG (docs/architecture.svg), with no dependencies.

How to run:   .venv/bin/python docs/architecture_svg.py [--out docs/architecture.svg]
Results:      the SVG that docs/ARCHITECTURE.md shows: each role as a box naming the module that
              owns it, each arrow labelled with the record (oni_sys/contracts.py) it carries,
              and the two runtimes that place the roles.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from xml.sax.saxutils import escape

# (key, title, module, x, y, width, height, fill)
BOXES = [
    ("runner", "env runner", "actors/env_runner.py", 30, 70, 210, 70, "#e8f1fb"),
    ("policy_r", "policy (acting copy)", "models/policy.py", 45, 150, 180, 44, "#f4f4f4"),
    ("learner", "policy learner", "learners/policy_learner.py", 480, 70, 230, 70, "#e8f1fb"),
    (
        "policy_l",
        "policy + V-trace/APPO",
        "models/policy.py, learners/vtrace.py",
        450,
        150,
        290,
        44,
        "#f4f4f4",
    ),
    ("intrinsic", "intrinsic reward", "learners/intrinsic.py", 500, 204, 190, 44, "#f4f4f4"),
    ("annotator", "annotation service", "annotators/service.py", 30, 330, 210, 70, "#fbf1e6"),
    (
        "store",
        "label store (SQLite)",
        "annotators/annotation_store.py",
        20,
        430,
        230,
        44,
        "#f4f4f4",
    ),
    ("llm", "LLM backend", "llamacpp / openai / vllm", 20, 484, 230, 44, "#f4f4f4"),
    (
        "reward",
        "reward learner",
        "learners/reward_learner.py, learners/reward_models/",
        385,
        330,
        365,
        70,
        "#fbf1e6",
    ),
    ("envs", "environments", "envs/ (spec, slots, captioners)", 20, 10, 230, 44, "#f4f4f4"),
]

# (from, to, label, label x, label y, path points)
ARROWS = [
    ("runner", "learner", "Fragment", 360, 92, [(240, 100), (480, 100)]),
    ("learner", "runner", "WeightsPacket", 360, 132, [(480, 122), (240, 122)]),
    ("runner", "annotator", "captions + sightings", 100, 270, [(95, 194), (95, 330)]),
    ("annotator", "reward", "LabelRecord /", 320, 350, [(240, 365), (385, 365)]),
    ("annotator", "reward", "PreferenceRecord", 320, 388, []),
    ("reward", "learner", "RewardSnapshot", 690, 290, [(640, 330), (640, 248)]),
]


def box(key: str, title: str, module: str, x: int, y: int, w: int, h: int, fill: str) -> str:
    big = h >= 60
    return (
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" stroke="#555"/>'
        f'<text x="{x + w / 2}" y="{y + (28 if big else 19)}" font-size="{15 if big else 13}" '
        f'text-anchor="middle" font-weight="{"bold" if big else "normal"}">{escape(title)}</text>'
        f'<text x="{x + w / 2}" y="{y + (50 if big else 36)}" font-size="11" '
        f'text-anchor="middle" fill="#333" font-family="monospace">{escape(module)}</text>'
    )


def arrow(points: list[tuple[int, int]], label: str, lx: int, ly: int) -> str:
    """An arrow along ``points`` with its label (no points: a second label line only)."""
    text = (
        f'<text x="{lx}" y="{ly}" font-size="12" text-anchor="middle" fill="#1f4e8c">'
        f"{escape(label)}</text>"
    )
    if not points:
        return text
    path = " ".join(f"{x},{y}" for x, y in points)
    return (
        f'<polyline points="{path}" fill="none" stroke="#1f4e8c" stroke-width="2" '
        f'marker-end="url(#head)"/>' + text
    )


def render() -> str:
    """The whole SVG document."""
    parts = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="760" height="660" '
        'font-family="Helvetica, Arial, sans-serif">',
        '<defs><marker id="head" markerWidth="10" markerHeight="8" refX="9" refY="4" '
        'orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="#1f4e8c"/></marker></defs>',
        '<rect width="760" height="660" fill="white"/>',
    ]
    parts += [box(*b) for b in BOXES]
    parts.append(
        '<line x1="135" y1="54" x2="135" y2="70" stroke="#555" stroke-dasharray="3,3"/>'
        '<line x1="135" y1="400" x2="135" y2="430" stroke="#555" stroke-dasharray="3,3"/>'
    )
    parts += [arrow(a[5], a[2], a[3], a[4]) for a in ARROWS]
    notes = [
        "Records on the arrows: oni_sys/contracts.py (imports no role). One driver loop for both",
        "runtimes (Runtime._train_loop in runtime/base.py); each runtime only places the calls.",
        "serial (runtime/serial.py): one process; runner, learner, annotator and reward learner",
        "   stepped in a fixed order after every batch: deterministic for a seed while the LLM answers.",
        "ray (runtime/ray_runtime.py, ray_actors.py): the four large boxes are Ray actors;",
        "   fragments and weights travel through the object store, captions through the driver.",
    ]
    for i, line in enumerate(notes):
        parts.append(
            f'<text x="20" y="{560 + 16 * i}" font-size="12" fill="#222">{escape(line)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).with_name("architecture.svg")
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    args.out.write_text(render())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
