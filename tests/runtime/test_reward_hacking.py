"""Reward hacking is visible: on the Vault's trap, a careless annotator rule pays for bumping the
locked vault again and again; the metrics, the log, the progress line and ``oni-sys rewards``
all point at that caption. With anchored rules the locked-door caption earns nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from oni_sys.cli import ProgressBar
from oni_sys.envs.vault import KEY_CAPTION, LOCKED_CAPTION

BIN = Path(sys.executable).parent
# configs/vault.yaml with the rules replaced: "key" matches the pick-up and the locked door.
TRAP = [
    "annotator.rules=[{pattern: key, label: 1}]",
    "reward.beta=0",  # no per-episode count decay: every bump pays c_int
    "reward.c_int=0.5",  # ~47 per episode for bumping against 1.5 for key and vault
    "reward.hacking_patience_steps=20000",
    "train.tensorboard=false",
]


def _rewards_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "oni-sys"), "rewards", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _table_rows(stdout: str) -> list[list[str]]:
    """The table's rows after its header line, split into 7 columns plus the caption text."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "paid"])
    return [line.split(None, 7) for line in lines[start + 1 :] if line.strip()]


@pytest.mark.parametrize("kind", ["serial", pytest.param("ray", marks=pytest.mark.slow)])
def test_the_trap_is_reported_as_reward_hacking(train, caplog, kind):
    caplog.set_level(logging.WARNING, logger="oni_sys")
    bar = ProgressBar(50_000, enabled=True)
    bar.start(0)
    try:
        runtime, run_dir, rows = train(
            "configs/vault.yaml",
            *TRAP,
            f"runtime.kind={kind}",
            "train.total_env_steps=50000",
            reporter=bar,
        )
        postfix = bar.bar.postfix
    finally:
        bar.close()
    last = rows[-1]
    assert last["env_steps"] >= 50000
    # The agent farms the locked door: that one caption earns nearly all the intrinsic reward,
    # and the extrinsic return (entering the vault) does not improve.
    assert last["intrinsic_top_caption_share"] >= 0.95, [
        r.get("intrinsic_top_caption_share") for r in rows
    ]
    assert last["reward_hacking_suspected"] == 1.0
    assert all("reward_hacking_suspected" in r for r in rows)
    assert "REWARD HACKING? top caption" in postfix
    warnings = [
        r.getMessage() for r in caplog.records if "reward hacking suspected" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings  # one line when it starts, not one per row
    assert repr(LOCKED_CAPTION) in warnings[0]

    table = json.loads((run_dir / "intrinsic_rewards.json").read_text())
    assert table["captions"][0]["text"] == LOCKED_CAPTION
    assert table["annotator_version"].startswith("rules@")

    done = _rewards_cli(str(run_dir), "--top", "3")
    assert done.returncode == 0, done.stderr
    table_rows = _table_rows(done.stdout)
    assert len(table_rows) <= 3
    rank, _paid, _share, _window, sightings, r_int, label, text = table_rows[0]
    assert (rank, label, r_int, text) == ("1", "1", "1.000", LOCKED_CAPTION)
    assert int(sightings) > 10_000


def test_anchored_rules_pay_nothing_for_the_locked_door(train):
    _, run_dir, rows = train(
        "configs/vault.yaml",
        *TRAP[1:],  # the anchored rules of configs/vault.yaml, the rest as in the trap
        "train.total_env_steps=25000",
    )
    assert all("intrinsic_top_caption_share" in r for r in rows)
    table = json.loads((run_dir / "intrinsic_rewards.json").read_text())
    by_text = {c["text"]: c for c in table["captions"]}
    locked = by_text[LOCKED_CAPTION]
    assert locked["sightings"] > 0 and locked["paid"] == 0.0  # seen, and never paid
    assert by_text[KEY_CAPTION]["paid"] > 0

    done = _rewards_cli(str(run_dir))
    assert done.returncode == 0, done.stderr
    listed = {row[-1]: row for row in _table_rows(done.stdout)}
    assert listed[LOCKED_CAPTION][1] == "0" and listed[LOCKED_CAPTION][6] == "0"  # paid, label
    assert _table_rows(done.stdout)[0][-1] != LOCKED_CAPTION


def test_rewards_cli_says_what_is_missing_in_one_sentence(tmp_path):
    done = _rewards_cli(str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such run directory" in done.stderr
    (tmp_path / "run").mkdir()  # e.g. a reward.kind=none run
    done = _rewards_cli(str(tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "intrinsic_rewards.json" in done.stderr
    done = _rewards_cli(str(tmp_path / "run"), "--top", "0")
    assert done.returncode == 2 and "positive integer" in done.stderr


def test_suspicion_needs_a_dominant_caption_and_a_return_that_stopped_rising(caplog):
    from oni_sys.runtime.tracker import HackingMonitor

    caplog.set_level(logging.WARNING, logger="oni_sys")
    monitor = HackingMonitor(share=0.8, patience=100, window_updates=5)

    def judge(steps, ret, share, m=monitor):
        return m.update(steps, ret, share, lambda: LOCKED_CAPTION, "runs/x")

    assert not judge(50, 0.1, 1.0)  # younger than the patience: never suspected
    assert not judge(100, 0.3, 1.0)  # rose above the best of 100 steps ago (none yet)
    assert not judge(150, 0.2, 0.79)  # no caption dominates (and the best rose from 0.1)
    assert judge(200, 0.2, 0.8)  # best now 0.3 = best at step 100: stalled, and dominant
    assert judge(250, float("nan"), 0.9)  # no episode finished: no rise either
    assert judge(260, 0.2, 0.65)  # hysteresis: a share just under 0.8 does not clear it
    saved = monitor.state_dict()
    assert not judge(300, 0.5, 0.95)  # the return rose above 0.3: cleared
    assert not judge(310, 0.5, 0.59)  # (and a share below 0.8 - 0.2 would clear it too)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(f"reward hacking suspected: {LOCKED_CAPTION!r} earned 80%")
    assert messages[1].startswith("reward hacking no longer suspected")

    resumed = HackingMonitor(share=0.8, patience=100, window_updates=5)
    resumed.load_state_dict(saved)  # the history survives a checkpoint
    assert resumed.update(300, 0.3, 0.95, lambda: None, "runs/x")  # 0.3 is no rise over 0.3
