"""Writes the ONI experiment configs in this folder: ``python configs/oni/generate.py``.

Every task x reward kind, with ONI's published coefficients (Zheng et al. 2024 and the ONI
README: c_ext = 0.1 on Score and 10 on the goal tasks, the raw reward clipped to +-10 before
c_ext as ONI's actor does (so a goal-task success weighs 100, not 500), beta = 3, c_int = 0.4 for the
label-based rewards; ranking rewards are normalised to unit scale, so 0.1), the extended
28-action set ONI used, in two sizes:

- ``<task>_<kind>.yaml``: a GPU node (learner on the GPU, 16 env runners, vLLM annotator
  serving Llama 3.1 8B Instruct as ONI did; adjust ``annotator.model`` to what you have);
- ``small/<task>_<kind>.yaml``: this project's 2-core CPU machine (2 runners, embedded Gemma
  3 270M through llama.cpp, smaller network).

A test checks the files are what this script writes and that each one validates.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TASKS = ["Score", "Staircase", "StaircaseLvl3", "StaircaseLvl4", "Oracle"]
KINDS = ["none", "hashing", "classification", "ranking"]
HERE = Path(__file__).resolve().parent


def config(task: str, kind: str, small: bool) -> dict:
    """One experiment."""
    reward: dict = {
        "kind": kind,
        "c_ext": 0.1 if task == "Score" else 10.0,
        "clip_ext": 10.0,
        "beta": 3.0,
    }
    if kind != "none":
        reward["c_int"] = 0.1 if kind == "ranking" else 0.4
    annotator: dict = {
        "prompt": "ranking" if kind == "ranking" else "classification",
        "goal": "score",
    }
    if small:
        annotator.update({"backend": "llamacpp"})
    else:
        annotator.update(
            {
                "backend": "vllm",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "concurrency": 64,
                "tensor_parallel_size": 1,
            }
        )
    out = {
        "name": f"oni_{task.lower()}_{kind}" + ("_small" if small else ""),
        "seed": 0,
        "env": {
            "id": f"nle:{task}",
            "num_envs": 16 if small else 32,
            "kwargs": {"extended_actions": True},
        },
        "model": {"kind": "nethack", "hidden_size": 256 if small else 512},
        "algo": {
            "lr": 2.0e-4,
            "gamma": 0.999,
            "rollout": 32,
            "num_epochs": 1,
            "num_minibatches": 1,
            "fragments_per_batch": 1 if small else 4,
            "ent_coef": 0.001,
            "max_grad_norm": 4.0,
        },
        "runtime": {"kind": "ray", "num_env_runners": 2 if small else 16},
        "train": {
            "total_env_steps": 1_000_000 if small else 2_000_000_000,
            "log_every_updates": 10 if small else 50,
            "checkpoint_every_updates": 100 if small else 1000,
        },
        "reward": reward,
    }
    if kind != "none":
        out["annotator"] = annotator
    return out


def main() -> None:
    (HERE / "small").mkdir(exist_ok=True)
    for small in (False, True):
        for task in TASKS:
            for kind in KINDS:
                path = HERE / ("small" if small else "") / f"{task.lower()}_{kind}.yaml"
                header = f"# ONI {task}, reward {kind}{' (small CPU variant)' if small else ''}; written by configs/oni/generate.py\n"
                path.write_text(header + yaml.safe_dump(config(task, kind, small), sort_keys=False))


if __name__ == "__main__":
    main()
