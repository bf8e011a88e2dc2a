"""Ray is imported only in ``oni_sys/runtime/``: every other module imports without Ray and names
Ray in no import statement (not even inside a function), so the serial runtime and ``oni-sys
annotate`` never start it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oni_sys"
RUNTIME = PACKAGE / "runtime"

#: top-level packages of the optional extras (pyproject.toml): a module needing a missing one is
#: skipped, not failed
OPTIONAL = {"nle", "llama_cpp", "vllm", "pettingzoo", "pygame", "mpe2", "matplotlib"}

# Run in a fresh interpreter, so nothing has imported Ray yet. Prints one JSON object:
# {"failed": {module: reason}, "skipped": {module: missing package}, "imported": [modules]}.
IMPORT_ALL = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback

    OPTIONAL = set(sys.argv[1].split(","))

    attempts = []

    class BlockRay:
        '''A meta-path finder that refuses ``ray`` and ``ray.*`` (and notes each attempt).'''

        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                attempts.append("".join(traceback.format_stack(limit=12)))
                raise ModuleNotFoundError(f"{name} is blocked by test_ray_boundary", name=name)
            return None

    sys.meta_path.insert(0, BlockRay())

    def modules(package):
        '''Every module of ``package``, oni_sys.runtime (which may use Ray) left out.'''
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name == "oni_sys.runtime" or info.name.startswith("oni_sys.runtime."):
                continue
            yield info.name
            if info.ispkg:
                try:
                    sub = importlib.import_module(info.name)
                except Exception:
                    continue  # reported when the name itself is imported below
                yield from modules(sub)

    failed, skipped, imported = {}, {}, []
    for name in modules(importlib.import_module("oni_sys")):
        attempts.clear()
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top in OPTIONAL:
                skipped[name] = exc.name
            else:
                failed[name] = "".join(traceback.format_exception(exc))[-2000:]
        except BaseException as exc:
            failed[name] = "".join(traceback.format_exception(exc))[-2000:]
        else:
            imported.append(name)
            if attempts:  # imported, but only because the ImportError was caught
                failed[name] = "tried to import Ray:\\n" + attempts[0][-2000:]
    print(json.dumps({"failed": failed, "skipped": skipped, "imported": imported}))
    """
)


def _non_runtime_sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if RUNTIME not in p.parents)


def _import_graph():
    """docs/import_graph.py, the one reader of import statements (also `--check` in the docs)."""
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "docs" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ray_imports(source: str) -> list[int]:
    """Lines of every import of Ray in ``source``, at any depth."""
    return [
        line
        for name, line in _import_graph().imports_of(source)
        if name == "ray" or name.startswith("ray.")
    ]


def test_the_static_check_finds_every_kind_of_ray_import() -> None:
    source = textwrap.dedent(
        """
        import os, ray.util
        def f():
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            import importlib
            return importlib.import_module("ray"), __import__("ray.exceptions")
        from .ray_like import x
        import array, rayleigh
        """
    )
    assert ray_imports(source) == [2, 4, 6, 6]


def test_no_module_outside_runtime_names_ray_in_an_import() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _non_runtime_sources()
        for line in ray_imports(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "Ray imported outside oni_sys/runtime/:\n" + "\n".join(offenders)


def test_layers_hold_and_no_module_imports_in_a_cycle() -> None:
    import_graph = _import_graph()
    assert import_graph.problems(import_graph.graph()) == []
    # and the check can fail: a role importing the runtime, a cycle, Ray in a role
    bad = {
        "oni_sys.envs.a": {"oni_sys.envs.b": 1, "oni_sys.runtime.base": 2, "ray": 3},
        "oni_sys.envs.b": {"oni_sys.envs.a": 1},
        "oni_sys.runtime.base": {},
    }
    found = import_graph.problems(bad)
    assert any("envs is below runtime" in p for p in found)
    assert any("imports ray" in p for p in found)
    assert any(p.startswith("import cycle: oni_sys.envs.a -> oni_sys.envs.b") for p in found)


def test_every_module_outside_runtime_imports_without_ray() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, ",".join(sorted(OPTIONAL))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    failed = result["failed"]
    assert not failed, "modules that do not import without Ray:\n" + "\n".join(
        f"--- {name}\n{reason}" for name, reason in failed.items()
    )
    # the walk reached the package's modules (not a vacuous pass)
    expected = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in _non_runtime_sources()
    }
    reached = set(result["imported"]) | set(result["skipped"])
    assert reached == expected - {"oni_sys"}, sorted(expected.symmetric_difference(reached))
