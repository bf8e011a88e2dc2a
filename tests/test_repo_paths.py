"""Nothing in the project names a path of one machine: what tests, docs and examples need is in
the repository, named relative to it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# paths of the machines the project is developed on: its work and root directories, the shared
# folder beside the repository (a cluster file's paths on the cluster's nodes are the user's)
MACHINE_PATH = re.compile(r"(?<![\w.])(/work/|/root/|\.\./shared/)")


def test_no_tracked_file_names_a_path_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    offenders = []
    for name in files:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}:
            continue
        if not path.is_file() or name == "tests/test_repo_paths.py":
            continue
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{name}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
