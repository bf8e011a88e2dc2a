"""The declared dependencies match what the package imports, and the base install (no Ray)
runs the serial runtime."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: declared but never imported by name, each with the reason it is declared
INDIRECT = {
    "tensorboard": "torch.utils.tensorboard writes the run's event files with it",
    "pygame-ce": "PettingZoo's classic games import pygame",
    "mpe2": "the particle envs, built from a pz: env spec at run time",
    "pytest": "dev: the test runner",
    "ruff": "dev: format and lint",
}
#: import name -> distribution, for packages that may not be installed here (GPU only)
NOT_INSTALLED = {"vllm": "vllm"}


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, str]:
    """Distribution (normalised) -> the pyproject section declaring it (``base`` or an extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    sections = {"base": project["dependencies"], **project["optional-dependencies"]}
    for section, requirements in sections.items():
        for requirement in requirements:
            out[_normal(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])] = section
    return out


def imported() -> dict[str, str]:
    """Distribution (normalised) -> a module of oni_sys that imports it."""
    by_import = importlib.metadata.packages_distributions()
    out = {}
    for module, edges in _import_graph().graph().items():
        for target in edges:
            top = target.split(".")[0]
            if top == "oni_sys" or top in sys.stdlib_module_names:
                continue
            dists = by_import.get(top) or [NOT_INSTALLED.get(top, top)]
            out.setdefault(_normal(dists[0]), module)
    return out


def test_every_import_is_declared_and_every_declaration_is_used() -> None:
    have, used = declared(), imported()
    undeclared = {dist: module for dist, module in used.items() if dist not in have}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    unused = set(have) - set(used) - {_normal(d) for d in INDIRECT}
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_ray_is_an_extra_not_a_base_dependency() -> None:
    assert declared()["ray"] == "ray"


# A fresh interpreter in which Ray cannot be imported, as in a base install.
NO_RAY = textwrap.dedent(
    """
    import sys

    class NoRay:
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoRay())
    import importlib.util
    importlib.util.find_spec = (lambda real: lambda name, *a: None if name == "ray" else
                                real(name, *a))(importlib.util.find_spec)
    from oni_sys.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _cli_without_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_RAY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_serial_training_runs_without_ray(tmp_path: Path) -> None:
    done = _cli_without_ray(
        "train",
        "configs/cartpole.yaml",
        f"runs_dir={tmp_path}",
        "name=no-ray",
        "runtime.kind=serial",
        "env.num_envs=4",
        "train.total_env_steps=2048",
        "train.progress=false",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "no-ray" / "checkpoints" / "latest.pt").is_file()


def test_ray_runtime_without_ray_is_one_config_error(tmp_path: Path) -> None:
    done = _cli_without_ray(
        "train", "configs/cartpole.yaml", f"runs_dir={tmp_path}", "runtime.kind=ray"
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "pip install 'oni-sys[ray]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing was started
