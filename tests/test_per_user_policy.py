"""The permutation-equivariant per-user actor-critic."""

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from multispin_agents.per_user_policy import PerUserActorCriticPolicy, infer_layout, permute_users
from multispin_env.observation import USER_FEATURES
from multispin_env.vector_env import make_sb3_vec_env

F = len(USER_FEATURES)


@pytest.mark.parametrize("mode", ["lengths", "full", "lengths_discrete"])
def test_relabelling_users_permutes_actions_and_keeps_value(mode):
    torch.manual_seed(0)
    venv = make_sb3_vec_env(
        "multispin/PaperLlama2Dynamic-v0",
        num_envs=3,
        seed=1,
        action_mode=mode,
        num_users=6,
        max_users=8,
    )
    model = PPO(
        PerUserActorCriticPolicy,
        venv,
        n_steps=16,
        batch_size=48,
        policy_kwargs={"hidden": 16, "action_bias": -0.3},
    )
    model.learn(48)  # move the weights away from their initial values
    obs = venv.reset()
    perm = np.r_[np.random.default_rng(0).permutation(6), 6, 7]
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = model.predict(permute_users(obs, perm, F), deterministic=True)
    if mode == "full":
        np.testing.assert_allclose(a1[:, :8][:, perm], a2[:, :8], atol=1e-6)
        np.testing.assert_allclose(a1[:, 8:][:, perm], a2[:, 8:], atol=1e-6)
    else:
        np.testing.assert_allclose(a1[:, perm], a2, atol=1e-6)
    with torch.no_grad():
        v1 = model.policy.predict_values(torch.as_tensor(obs))
        v2 = model.policy.predict_values(torch.as_tensor(permute_users(obs, perm, F)))
    np.testing.assert_allclose(v1.numpy(), v2.numpy(), atol=1e-5)


def test_padded_slots_do_not_change_active_users_actions():
    venv = make_sb3_vec_env(
        "multispin/PaperLlama2-v0",
        num_envs=2,
        seed=0,
        action_mode="lengths",
        num_users=5,
        max_users=8,
    )
    model = PPO(
        PerUserActorCriticPolicy, venv, n_steps=16, batch_size=32, policy_kwargs={"hidden": 16}
    )
    obs = venv.reset()
    other = obs.copy()
    other[:, 5 * F + 1 : 8 * F : F] = 3.0  # garbage in an empty slot's channel feature
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = model.predict(other, deterministic=True)
    np.testing.assert_allclose(a1[:, :5], a2[:, :5], atol=1e-6)


def test_layout_inference_and_errors():
    from gymnasium import spaces

    obs = spaces.Box(0, 1, (20 * F + 3,))
    assert infer_layout(obs, spaces.Box(-1, 1, (20,))) == (20, F, 1)
    assert infer_layout(obs, spaces.Box(-1, 1, (40,))) == (20, F, 2)
    assert infer_layout(obs, spaces.MultiDiscrete([25] * 20)) == (20, F, 25)
    with pytest.raises(ValueError, match="per-user action space"):
        infer_layout(obs, spaces.Discrete(25))
