"""Gymnasium layer: API checks, seeding, parity scalar vs batched vs SB3, reward, codec."""

import ast
import pathlib
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import multispin_env
from multispin_env.action_codec import MODES, ActionCodec, DecisionContext
from multispin_env.allocation import latency_equalising_bandwidth
from multispin_env.observation import USER_FEATURES
from multispin_env.vector_env import MultiSpinVectorEnv, make_sb3_vec_env

F = len(USER_FEATURES)  # per-user features in an observation
CORE = (
    "_jit",
    "allocation",
    "config",
    "observation",
    "physics",
    "rng",
    "simulator",
    "types",
    "verification",
)


def test_core_modules_do_not_import_rl_libraries():
    root = pathlib.Path(multispin_env.__file__).parent
    for name in CORE:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"gymnasium", "gym", "stable_baselines3", "torch"}, name


@pytest.mark.parametrize("env_id", sorted(multispin_env.ENV_IDS))
def test_gymnasium_and_sb3_checkers_pass(env_id):
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    extended = any(p in env_id for p in ("EarlyStop", "Deadline", "Pipeline"))
    for mode in MODES:
        if extended and mode.endswith("_discrete"):
            with pytest.raises(ValueError, match="cannot carry the extended protocol's levers"):
                gym.make(env_id, action_mode=mode)
            continue
        extra = {"base_policy": "homo"} if mode == "residual" else {}
        env = gym.make(env_id, action_mode=mode, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_env(env.unwrapped, skip_render_check=True)
            sb3_check_env(env.unwrapped, warn=False)


def test_make_with_overrides_and_clear_errors():
    env = gym.make("multispin/PaperQwen35-v0", num_users=8, bandwidth_hz=5e6, horizon_s=3.0)
    assert env.unwrapped.config.num_users == 8 and env.unwrapped.config.bandwidth_hz == 5e6
    assert env.observation_space.shape == (8 * F + 3,)
    with pytest.raises(ValueError, match="did you mean 'bandwidth_hz'"):
        gym.make("multispin/PaperLlama2-v0", bandwith_hz=1e6)
    with pytest.raises(ValueError, match="did you mean 'horizon_s'"):
        gym.make("multispin/PaperLlama2-v0", horizon=3)
    with pytest.raises(ValueError, match="set horizon_s instead"):
        gym.make_vec(
            "multispin/PaperLlama2-v0",
            num_envs=2,
            max_episode_steps=10,
            vectorization_mode="vector_entry_point",
        )
    with pytest.raises(ValueError, match="action mode"):
        gym.make("multispin/PaperLlama2-v0", action_mode="joint")
    with pytest.raises(ValueError, match="max_users"):
        gym.make("multispin/PaperLlama2-v0", max_users=4)
    with pytest.raises(ValueError, match="reward_weights"):
        gym.make("multispin/PaperLlama2-v0", reward_weights={"token": 1.0})
    env = gym.make("multispin/PaperLlama2-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action shape"):
        env.step(np.zeros(3, dtype=np.float32))


def _typical_action(codec, k, n=1, length=4):
    return codec.encode(np.full((n, k), length), np.full((n, k), 1.0 / k))


def test_reward_return_is_long_run_goodput():
    env = gym.make("multispin/PaperLlama2-v0", horizon_s=5.0).unwrapped
    env.reset(seed=3)
    action = _typical_action(env.codec, 20)[0]
    total_reward, tokens, elapsed, steps = 0.0, 0.0, 0.0, 0
    while True:
        obs, reward, terminated, truncated, info = env.step(action)
        assert not terminated
        inside = min(1.0, (5.0 - elapsed) / info["round_time_s"])
        tokens += inside * info["tokens"]
        elapsed += info["round_time_s"]
        total_reward += reward
        steps += 1
        if truncated:
            break
    assert elapsed >= 5.0 > elapsed - info["round_time_s"]  # truncated exactly at the horizon
    goodput = tokens / 5.0
    assert total_reward * 20 / 5.0 == pytest.approx(goodput)
    assert info["episode_goodput_tokens_per_s"] == pytest.approx(goodput)
    assert info["reward_components"]["tokens"] == pytest.approx(reward)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(action)


def test_reward_components_are_weighted():
    env = gym.make(
        "multispin/RealisticLlama2-v0", reward_weights={"tokens": 1.0, "time": 2.0, "energy": 0.5}
    ).unwrapped
    env.reset(seed=0)
    _, reward, _, _, info = env.step(_typical_action(env.codec, 20)[0])
    c = info["reward_components"]
    assert c["time"] < 0 and c["energy"] < 0
    assert reward == pytest.approx(c["tokens"] + 2.0 * c["time"] + 0.5 * c["energy"])


def test_seed_determinism_and_pickling():
    # a long horizon: no truncation inside the 15 compared steps, whatever the actions
    env = gym.make("multispin/PaperLlama2Dynamic-v0", horizon_s=1e6).unwrapped
    env.action_space.seed(0)
    actions = [env.action_space.sample() * 0.3 for _ in range(15)]
    obs_a, _ = env.reset(seed=42)
    traj_a = [env.step(a)[:2] for a in actions[:5]]
    clone = pickle.loads(pickle.dumps(env))
    rest_a = [env.step(a)[:2] for a in actions[5:]]
    rest_clone = [clone.step(a)[:2] for a in actions[5:]]
    for (o1, r1), (o2, r2) in zip(rest_a, rest_clone, strict=True):
        np.testing.assert_array_equal(o1, o2)
        assert r1 == r2
    obs_b, _ = env.reset(seed=42)
    np.testing.assert_array_equal(obs_a, obs_b)
    for (o1, r1), a in zip(traj_a, actions[:5], strict=True):
        o2, r2 = env.step(a)[:2]
        np.testing.assert_array_equal(o1, o2)
        assert r1 == r2
    obs_c, _ = env.reset(seed=43)
    assert not np.array_equal(obs_a, obs_c)


@pytest.mark.parametrize("env_id", ["multispin/PaperLlama2-v0", "multispin/RealisticLlama2-v0"])
def test_batched_env_matches_scalar_envs_across_autoresets(env_id):
    n, seed = 4, 100
    venv = gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point", horizon_s=1.5)
    envs = [gym.make(env_id, horizon_s=1.5).unwrapped for _ in range(n)]
    obs_v, _ = venv.reset(seed=seed)
    obs_s = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    np.testing.assert_array_equal(obs_v, obs_s)
    rng = np.random.default_rng(1)
    resets = 0
    for _ in range(40):
        actions = rng.uniform(-0.6, 0.2, size=(n,) + venv.single_action_space.shape)
        actions = actions.astype(np.float32)
        obs_v, rew_v, term_v, trunc_v, info_v = venv.step(actions)
        for i, e in enumerate(envs):
            o, r, te, tr, info = e.step(actions[i])
            assert r == rew_v[i] and te == term_v[i] and tr == trunc_v[i]
            np.testing.assert_array_equal(info["draft_lengths"], info_v["draft_lengths"][i])
            if tr:
                resets += 1
                np.testing.assert_array_equal(info_v["final_obs"][i], o)
                assert info_v["_final_obs"][i]
                o, _ = e.reset()
            np.testing.assert_array_equal(obs_v[i], o)
    assert resets >= 4  # the comparison crossed several autoresets


def test_sb3_vec_env_adapter_autoresets_like_sb3():
    vec = make_sb3_vec_env("multispin/PaperLlama2-v0", num_envs=3, seed=5, horizon_s=1.0)
    native = MultiSpinVectorEnv(num_envs=3, scenario="paper-llama2", horizon_s=1.0)
    obs = vec.reset()
    obs_native, _ = native.reset(seed=5)
    np.testing.assert_array_equal(obs, obs_native)
    actions = np.zeros((3,) + vec.action_space.shape, dtype=np.float32)
    dones_seen = 0
    for _ in range(12):
        obs, rewards, dones, infos = vec.step(actions)
        obs_n, rew_n, _, trunc_n, info_n = native.step(actions)
        np.testing.assert_array_equal(obs, obs_n)
        np.testing.assert_allclose(rewards, rew_n.astype(np.float32))
        for i in np.flatnonzero(dones):
            dones_seen += 1
            np.testing.assert_array_equal(infos[i]["terminal_observation"], info_n["final_obs"][i])
            assert infos[i]["TimeLimit.truncated"]
    assert dones_seen > 0


def test_padded_user_slots_are_zero_and_ignored():
    env = gym.make("multispin/PaperLlama2-v0", num_users=6, max_users=10).unwrapped
    obs, _ = env.reset(seed=0)
    f = F
    per_user = obs[: 10 * f].reshape(10, f)
    assert np.all(per_user[6:] == 0) and np.all(per_user[:6, 0] == 1)
    a = _typical_action(env.codec, 6)[0]
    b = a.copy()
    b[6:10] = 0.9  # length entries of empty slots
    b[16:20] = -0.7  # share logits of empty slots
    r1 = env.step(a)
    env.reset(seed=0)
    r2 = env.step(b)
    np.testing.assert_array_equal(r1[0], r2[0])
    assert r1[1] == r2[1]


def test_true_alpha_hidden_unless_asked_and_history_estimates_it():
    env = gym.make("multispin/PaperLlama2-v0", horizon_s=1e4).unwrapped
    assert not any("alpha_true" in n for n in env.feature_names)
    env.reset(seed=0)
    action = _typical_action(env.codec, 20, length=6)[0]
    column = env.feature_names.index("user0.alpha_hat")
    estimates = []
    for t in range(600):
        obs, *_ = env.step(action)
        if t >= 50:
            estimates.append(obs[: 20 * F].reshape(20, F)[:, column])
    # the EWMA estimate is noisy (a few rounds of memory) but centred on the true rate
    np.testing.assert_allclose(np.mean(estimates, axis=0), env.simulator.alpha[0], atol=0.04)
    told = gym.make("multispin/PaperLlama2Dynamic-v0", observe_true_alpha=True).unwrapped
    obs, _ = told.reset(seed=0)
    per_user = obs[: 20 * (F + 1)].reshape(20, F + 1)
    np.testing.assert_allclose(per_user[:, F], told.simulator.alpha[0], rtol=1e-6)


def test_observation_within_bounds_over_random_play():
    env = gym.make("multispin/RealisticLlama2-v0", horizon_s=5.0).unwrapped
    obs, _ = env.reset(seed=1)
    env.action_space.seed(1)
    for _ in range(200):
        assert env.observation_space.contains(obs)
        obs, _, _, truncated, _ = env.step(env.action_space.sample())
        if truncated:
            obs, _ = env.reset()


def _context(rng, n, k):
    shares = rng.uniform(0.2, 1.0, (n, k))
    return DecisionContext(
        rng.uniform(0.5, 9.0, (n, k)),
        rng.uniform(0.01, 0.04, (n, k)),
        31744.0,
        10e6,
        base_lengths=rng.integers(1, 26, (n, k)),  # a base allocation for residual actions
        base_bandwidth_hz=shares / shares.sum(axis=1, keepdims=True) * 10e6,
        base_bandwidth_for=lambda lengths: lengths / lengths.sum(axis=1, keepdims=True) * 10e6,
    )


@pytest.mark.parametrize("mode", MODES)
def test_codec_feasible_by_construction(mode):
    rng = np.random.default_rng(0)
    codec = ActionCodec(mode, max_users=12, max_draft_length=25)
    codec.space.seed(0)
    ctx = _context(rng, 64, 9)
    actions = np.stack([codec.space.sample() for _ in range(64)])
    lengths, bandwidth = codec.decode(actions, ctx)
    assert lengths.shape == bandwidth.shape == (64, 9)
    assert lengths.min() >= 1 and lengths.max() <= 25
    assert np.all(bandwidth > 0)
    np.testing.assert_allclose(bandwidth.sum(axis=1), 10e6, rtol=1e-9)
    if mode.startswith("homogeneous"):
        assert np.all(lengths == lengths[:, :1])


@pytest.mark.parametrize("mode", [m for m in MODES if m != "residual"])
def test_codec_round_trips(mode):
    rng = np.random.default_rng(1)
    codec = ActionCodec(mode, max_users=10, max_draft_length=25)
    ctx = _context(rng, 50, 10)
    lengths = rng.integers(1, 26, size=(50, 10))
    if mode.startswith("homogeneous"):
        lengths = np.repeat(lengths[:, :1], 10, axis=1)
    shares = rng.uniform(1.0, 15.0, size=(50, 10))
    shares /= shares.sum(axis=1, keepdims=True)
    decoded, bandwidth = codec.decode(codec.encode(lengths, shares * 10e6), ctx)
    np.testing.assert_array_equal(decoded, lengths)
    if mode == "full":
        np.testing.assert_allclose(bandwidth / 10e6, shares, rtol=1e-5)
    else:  # the paper's latency-equalising split for the decoded lengths
        expected, _ = latency_equalising_bandwidth(
            lengths, ctx.t_draft_s, ctx.spectral_eff_est, 31744.0, 10e6
        )
        np.testing.assert_allclose(bandwidth, expected, rtol=1e-9)


def test_codec_rejects_bad_actions():
    codec = ActionCodec("lengths_discrete", max_users=4, max_draft_length=8)
    ctx = _context(np.random.default_rng(0), 1, 4)
    with pytest.raises(ValueError, match="integers in"):
        codec.decode(np.array([0, 1, 8, 2]), ctx)
    box = ActionCodec("full", max_users=4, max_draft_length=8)
    with pytest.raises(ValueError, match="NaN"):
        box.decode(np.full(8, np.nan, dtype=np.float32), ctx)


def test_render_modes():
    env = gym.make("multispin/PaperLlama2-v0", render_mode="ansi", num_users=5)
    env.reset(seed=0)
    env.action_space.seed(0)
    assert "no round played yet" in env.render()
    env.step(env.action_space.sample())
    text = env.render()
    assert "* = straggler" in text and text.count("\n") >= 7
    img_env = gym.make("multispin/PaperLlama2-v0", render_mode="rgb_array", num_users=5)
    img_env.reset(seed=0)
    img_env.action_space.seed(0)
    img_env.step(img_env.action_space.sample())
    frame = img_env.render()
    assert frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8
    assert frame.std() > 0
    no_render = gym.make("multispin/PaperLlama2-v0")
    no_render.reset(seed=0)
    assert no_render.render() is None
