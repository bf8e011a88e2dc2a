"""Credit timing: a caption is paid at the step whose action produced it (docs/ALGORITHM.md §5).

ONI pays the message already on screen, one action late; this project pays the caption of the
observation an action reached, with that action's own extrinsic reward, so the message of an
episode's last step is paid and the reset observation's is not.
"""

from __future__ import annotations

import numpy as np

from oni_sys.actors.env_runner import EnvRunner
from oni_sys.config import load_config
from oni_sys.contracts import LabelRecord
from oni_sys.envs import vault
from oni_sys.envs.captions import caption_id
from oni_sys.learners.intrinsic import IntrinsicReward
from oni_sys.learners.reward_models import make_reward_model


def _cell(obs_row: np.ndarray, size: int) -> tuple[int, tuple[int, int]]:
    """(plane, (x, y)) of the agent in one Vault observation."""
    flat = int(np.flatnonzero(obs_row)[0])
    plane, cell = divmod(flat, size * size)
    return plane, (cell % size, cell // size)


def test_each_caption_is_paid_to_the_action_that_produced_it():
    size = 9
    cfg = load_config(
        "configs/vault.yaml",
        ["env.num_envs=16", "algo.rollout=100", "seed=3", "reward.beta=0", "reward.c_int=1"],
    )
    runner = EnvRunner(cfg)
    fragments = [runner.sample() for _ in range(12)]
    runner.close()
    # A hashing reward model that labels every caption Vault can produce 1, so every paid step
    # is visible in the shaped reward.
    texts = [vault.KEY_CAPTION, vault.LOCKED_CAPTION, vault.VAULT_CAPTION, vault.WALL_CAPTION]
    model = make_reward_model(cfg.reward, cfg.seed)
    model.add_labels([LabelRecord(caption_id(t), t, 1, 1.0) for t in texts])
    intrinsic = IntrinsicReward(cfg.reward)
    intrinsic.register({caption_id(t): t for t in texts})
    intrinsic.set_snapshot(model.snapshot())
    key, vault_id = caption_id(vault.KEY_CAPTION), caption_id(vault.VAULT_CAPTION)
    paid_keys = paid_vaults = 0
    for f in fragments:
        shaped, paid = intrinsic.shape(f.rewards, f.caption_ids, f.caption_counts)
        # Every step with a caption pays c_int at that very step, and no other step pays.
        assert np.array_equal(paid != 0, f.caption_ids != 0)
        for t, col in zip(*np.nonzero(f.caption_ids == key), strict=True):
            # The action of this step walked from a neighbour of the key cell onto it, keyless.
            plane, (x, y) = _cell(f.obs["obs"][t, col], size)
            assert plane == 0 and (x, y) in {(2, 1), (1, 2)}
            dx, dy = vault._MOVES[int(f.actions[t, col])]
            assert (x + dx, y + dy) == (1, 1)
            # ... and the observation it reached shows the key in hand.
            assert _cell(f.obs["obs"][t + 1, col], size)[0] == 1 or f.first[t + 1, col]
            paid_keys += 1
        for t, col in zip(*np.nonzero(f.caption_ids == vault_id), strict=True):
            # The vault caption is paid on the episode's last step, with the extrinsic reward.
            assert f.terminated[t, col] and f.rewards[t, col] == 1.0
            assert shaped[t, col] == 1.0 + cfg.reward.c_int
            paid_vaults += 1
    assert paid_keys > 0 and paid_vaults > 0, (paid_keys, paid_vaults)
