"""The architecture picture in docs/ is the one its script draws from the code's role list."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_svg_is_up_to_date_and_names_existing_modules() -> None:
    spec = importlib.util.spec_from_file_location("svg", ROOT / "docs" / "architecture_svg.py")
    svg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(svg)
    assert (ROOT / "docs" / "architecture.svg").read_text() == svg.render(), (
        "docs/architecture.svg is stale: run .venv/bin/python docs/architecture_svg.py"
    )
    for _, _, modules, *_ in svg.BOXES:
        for module in modules.split(", "):
            if module.endswith((".py", "/")):
                assert (ROOT / "oni_sys" / module).exists(), module
