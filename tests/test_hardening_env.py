"""Hardening of the env layer: every config override and every action is checked against its
type and range with an error naming the field (fuzz tables), valid odd types (numpy scalars,
float16/integer actions) work, reward weights set mid-training take effect, render after
reset, and Gymnasium's sync vectorisation vs the native batched env."""

import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import multispin_env  # noqa: F401  (registers the ids)
from multispin_env.config import ScenarioConfig, load_preset
from multispin_env.vector_env import MultiSpinVectorEnv

ENV = "multispin/PaperLlama2-v0"
NAN, INF = math.nan, math.inf

# (override, value, error type, regex the message must match: it names the field)
BAD_OVERRIDES = [
    ("observe_true_alpha", "false", TypeError, r"observe_true_alpha='false' must be a bool"),
    ("rayleigh_fading", "false", TypeError, r"ScenarioConfig\.rayleigh_fading='false'.*bool"),
    ("per_request_acceptance", 1, TypeError, r"per_request_acceptance=1 must be a bool"),
    (
        "reward_weights",
        {"tokens": NAN},
        ValueError,
        r"reward_weights\['tokens'\] must be finite, got nan",
    ),  # fmt: skip
    (
        "reward_weights",
        {"tokens": 1.0, "time": INF},
        ValueError,
        r"reward_weights\['time'\] must be finite, got inf",
    ),  # fmt: skip
    (
        "reward_weights",
        {"tokens": "1"},
        TypeError,
        r"reward_weights\['tokens'\]='1' must be a number",
    ),  # fmt: skip
    ("reward_weights", {"goodput": 1.0}, ValueError, r"reward_weights has unknown component"),
    ("reward_weights", 1.0, TypeError, r"reward_weights=1.0 must be a mapping"),
    ("csi_error_std", INF, ValueError, r"csi_error_std=inf.*finite"),
    ("csi_error_std", NAN, ValueError, r"csi_error_std=nan.*finite"),
    ("draft_energy_j_per_token", INF, ValueError, r"draft_energy_j_per_token=inf.*finite"),
    ("horizon_s", INF, ValueError, r"horizon_s=inf must be a finite number > 0"),
    ("horizon_s", NAN, ValueError, r"horizon_s=nan must be a finite number > 0"),
    ("horizon_s", True, TypeError, r"horizon_s=True must be a number"),
    ("bandwidth_hz", True, TypeError, r"ScenarioConfig\.bandwidth_hz=True must be a number"),
    ("bandwidth_hz", "5e6", TypeError, r"bandwidth_hz='5e6' must be a number.*without quotes"),
    ("t_draft_spread", "0.1", TypeError, r"ScenarioConfig\.t_draft_spread='0.1' must be a number"),
    ("num_users", 5.0, TypeError, r"ScenarioConfig\.num_users=5.0 must be an integer"),
    ("num_users", True, TypeError, r"ScenarioConfig\.num_users=True must be an integer"),
    ("max_users", "30", TypeError, r"max_users='30' must be an integer"),
    ("history_decay", NAN, ValueError, r"history_decay=nan must be in \(0, 1\)"),
    ("action_mode", 3, TypeError, r"action_mode=3 must be a string"),
    ("server_t_draft_s", INF, ValueError, r"server_t_draft_s=inf.*finite"),
    ("request_length_tokens", INF, ValueError, r"request_length_tokens=inf.*finite"),
    ("tx_power_w", NAN, ValueError, r"tx_power_w=nan: must be a finite number > 0"),
    ("tasks", [{"name": "x", "alpha_mean": "0.7"}], TypeError, r"tasks\['x'\]\.alpha_mean='0.7'"),
    (
        "tasks",
        [{"name": "x", "alpha_mean": 0.7, "weight": INF}],
        ValueError,
        r"tasks\['x'\]\.weight=inf",
    ),  # fmt: skip
    ("tasks", [{"name": "x", "mean": 0.7}], ValueError, r"tasks\[0\].*alpha_mean"),
]


@pytest.mark.parametrize(
    "field, value, error, message", BAD_OVERRIDES, ids=[f"{b[0]}={b[1]!r}" for b in BAD_OVERRIDES]
)
def test_bad_override_raises_naming_the_field(field, value, error, message):
    with pytest.raises(error, match=message):
        gym.make(ENV, **{field: value})


def _env(mode, **kw):
    env = gym.make(ENV, action_mode=mode, **kw).unwrapped  # K = 20 users, L_max = 25
    env.reset(seed=0)
    return env


def _with(size, index, value, dtype=np.float32):
    a = np.zeros(size, dtype=dtype)
    a[index] = value
    return a


# (action mode, action, error type, message regex): expected shape / range in the user's terms
BAD_ACTIONS = [
    (
        "full",
        np.zeros(3, np.float32),
        ValueError,
        r"expected an action of shape \(40,\), got shape \(3,\)",
    ),  # fmt: skip
    (
        "full",
        np.zeros((1, 40), np.float32),
        ValueError,
        r"expected an action of shape \(40,\), got shape \(1, 40\)",
    ),  # fmt: skip
    ("full", _with(40, 5, NAN), ValueError, r"NaN or inf: nan at index \(5,\)"),
    ("full", _with(40, 7, -INF, np.float16), ValueError, r"NaN or inf: -inf at index \(7,\)"),
    ("full", np.array(["0.1"] * 40), TypeError, r"'full' actions must be numbers.*<U3"),
    ("full", np.zeros(40, dtype=bool), TypeError, r"must be numbers.*bool"),
    ("full", [[0.0, 0.1], [0.2]], ValueError, r"not an array of shape \(40,\)"),
    ("lengths", np.zeros(20, np.complex64), TypeError, r"'lengths' actions must be numbers"),
    (
        "homogeneous",
        np.zeros(2, np.float32),
        ValueError,
        r"expected an action of shape \(1,\), got shape \(2,\)",
    ),  # fmt: skip
    (
        "lengths_discrete",
        _with(20, 3, 2.5, np.float64),
        ValueError,
        r"integers in \[0, 24\].*got 2.5 at index \(3,\)",
    ),  # fmt: skip
    (
        "lengths_discrete",
        _with(20, 4, 25, np.int64),
        ValueError,
        r"integers in \[0, 24\].*got 25 at index \(4,\)",
    ),  # fmt: skip
    ("lengths_discrete", _with(20, 0, -1, np.int64), ValueError, r"got -1 at index \(0,\)"),
    (
        "lengths_discrete",
        _with(20, 2, NAN, np.float64),
        ValueError,
        r"NaN or inf: nan at index \(2,\)",
    ),  # fmt: skip
    (
        "lengths_discrete",
        np.zeros(19, np.int64),
        ValueError,
        r"expected an action of shape \(20,\)",
    ),  # fmt: skip
    ("homogeneous_discrete", 3.5, ValueError, r"integers in \[0, 24\].*got 3.5"),
    ("homogeneous_discrete", 25, ValueError, r"got 25"),
    (
        "homogeneous_discrete",
        np.array([3]),
        ValueError,
        r"expected an action of shape \(\), got shape \(1,\)",
    ),  # fmt: skip
    ("homogeneous_discrete", True, TypeError, r"must be numbers"),
]


@pytest.mark.parametrize(
    "mode, action, error, message",
    BAD_ACTIONS,
    ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_ACTIONS)],
)
def test_bad_action_raises_in_the_users_terms(mode, action, error, message):
    env = _env(mode)
    with pytest.raises(error, match=message):
        env.step(action)


def test_bad_batched_action_names_the_expected_batch_shape():
    venv = gym.make_vec(ENV, num_envs=2, num_users=4)
    venv.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected actions of shape \(2, 8\), got shape \(8,\)"):
        venv.step(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"expected actions of shape \(2, 8\), got shape \(3, 8\)"):
        venv.step(np.zeros((3, 8), np.float32))
    bad = np.zeros((2, 8), np.float32)
    bad[1, 6] = np.nan
    with pytest.raises(ValueError, match=r"nan at env 1, index \(6,\)"):
        venv.step(bad)


def _rollout(env, actions, seed=3):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for a in actions:
        o, r, _, tr, info = env.step(a)
        out += [o, r, info["draft_lengths"], info["bandwidth_hz"]]
        if tr:
            out.append(env.reset()[0])
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_numpy_scalar_overrides_work_like_python_numbers():
    odd = dict(
        num_users=np.int64(5),
        max_users=np.int32(8),
        bandwidth_hz=np.float32(5e6),
        horizon_s=np.float64(2.0),
        history_decay=np.float32(0.5),
        rayleigh_fading=np.bool_(True),
        reward_weights={"tokens": np.float32(1.0), "time": np.int64(2)},
    )
    plain = dict(
        num_users=5,
        max_users=8,
        bandwidth_hz=5e6,
        horizon_s=2.0,
        history_decay=0.5,
        rayleigh_fading=True,
        reward_weights={"tokens": 1.0, "time": 2.0},
    )
    a, b = gym.make(ENV, **odd).unwrapped, gym.make(ENV, **plain).unwrapped
    assert a.config == b.config and a.options == b.options
    assert type(a.config.num_users) is int and type(a.config.bandwidth_hz) is float
    assert type(a.options.max_users) is int and type(a.options.history_decay) is float
    a.action_space.seed(0)
    actions = [a.action_space.sample() for _ in range(30)]
    _assert_same(_rollout(a, actions), _rollout(b, actions))
    # the config itself, and TaskSpec fields
    cfg = ScenarioConfig(num_users=np.int64(7), t_draft_spread=np.float16(0.25))
    assert cfg.num_users == 7 and type(cfg.t_draft_spread) is float


def test_yaml_numbers_still_load_but_overrides_are_typed():
    doc = load_preset("paper-llama2").to_dict()
    doc.update(bandwidth_hz="5e6", t_draft_spread="0.1")  # YAML 1.1 reads 5e6 as a string
    cfg = ScenarioConfig.from_dict(doc)
    assert cfg.bandwidth_hz == 5e6 and cfg.t_draft_spread == 0.1
    with pytest.raises(TypeError, match="t_draft_spread"):
        load_preset("paper-llama2", t_draft_spread="0.1")
    with pytest.raises(TypeError, match="bandwidth_hz"):
        cfg.with_overrides(bandwidth_hz="5e6")


@pytest.mark.parametrize("mode", ["full", "lengths", "homogeneous"])
def test_float16_and_integer_box_actions_are_cast(mode):
    env = _env(mode)
    rng = np.random.default_rng(0)
    # values exact in float16, so the float16 action equals the float32 one
    actions = [rng.uniform(-1, 1, env.action_space.shape).astype(np.float16) for _ in range(20)]
    as16 = _rollout(env, actions)
    as32 = _rollout(env, [a.astype(np.float32) for a in actions])
    _assert_same(as16, as32)
    ints = [rng.integers(-1, 2, env.action_space.shape) for _ in range(10)]
    _assert_same(_rollout(env, ints), _rollout(env, [a.astype(np.float32) for a in ints]))


def test_box_actions_outside_the_bounds_are_clipped():
    env = _env("full")
    rng = np.random.default_rng(1)
    actions = [rng.uniform(-5, 5, env.action_space.shape).astype(np.float32) for _ in range(20)]
    _assert_same(_rollout(env, actions), _rollout(env, [np.clip(a, -1, 1) for a in actions]))


def test_discrete_actions_take_integral_floats_and_numpy_integers():
    env = _env("lengths_discrete")
    rng = np.random.default_rng(2)
    actions = [rng.integers(0, 25, 20) for _ in range(15)]
    ref = _rollout(env, actions)
    _assert_same(ref, _rollout(env, [a.astype(np.float64) for a in actions]))
    _assert_same(ref, _rollout(env, [a.astype(np.uint8) for a in actions]))
    homo = _env("homogeneous_discrete")
    ref = _rollout(homo, [3, 7, 24])
    _assert_same(ref, _rollout(homo, [np.int32(3), np.float64(7.0), np.array(24)]))


def test_reward_weights_changed_mid_training_take_effect():
    """RatePriceCallback changes the time price through set_reward_weights; the new weights
    must reach the reward (they did not: the kernel kept the weights of construction)."""
    venv = MultiSpinVectorEnv(num_envs=2, num_users=4)
    actions = np.zeros((2, 8), np.float32)
    venv.reset(seed=0)
    _, r_tokens, _, _, info = venv.step(actions)
    venv.reset(seed=0)
    venv.set_reward_weights({"tokens": 1.0, "time": 3.0})
    _, r_priced, _, _, info2 = venv.step(actions)
    components = info2["reward_components"]
    np.testing.assert_allclose(r_priced, components["tokens"] + 3.0 * components["time"])
    assert np.all(r_priced < r_tokens)
    assert venv.episodes.weights == {"tokens": 1.0, "time": 3.0}
    with pytest.raises(ValueError, match=r"reward_weights\['time'\] must be finite, got nan"):
        venv.set_reward_weights({"tokens": 1.0, "time": float("nan")})


def test_render_right_after_reset_shows_no_stale_round():
    env = gym.make(ENV, render_mode="ansi", num_users=4, horizon_s=1.0)
    env.reset(seed=0)
    env.action_space.seed(0)
    env.step(env.action_space.sample())
    assert "straggler" in env.render()
    env.reset(seed=1)
    text = env.render()
    assert "no round played yet" in text and "straggler" not in text
    img = gym.make(ENV, render_mode="rgb_array", num_users=4).unwrapped
    img.reset(seed=0)
    img.step(np.full(8, 0.9, np.float32))
    img.reset(seed=0)
    fresh = gym.make(ENV, render_mode="rgb_array", num_users=4).unwrapped
    fresh.reset(seed=0)
    np.testing.assert_array_equal(img.render(), fresh.render())  # no last-episode bars


def test_large_valid_csi_error_keeps_observations_finite_and_in_space():
    env = gym.make("multispin/RealisticLlama2-v0", csi_error_std=1e6, horizon_s=2.0).unwrapped
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    for _ in range(30):
        assert env.observation_space.contains(obs)
        obs, reward, _, truncated, info = env.step(env.action_space.sample())
        assert np.isfinite(reward) and np.all(np.isfinite(info["bandwidth_hz"]))
        if truncated:
            obs, _ = env.reset()


def test_sync_vector_env_matches_native_with_same_step_autoreset():
    """Gymnasium's sync vectorisation defaults to NEXT_STEP autoreset (documented in the
    class docstring); with SAME_STEP its trajectories equal the native batched env's."""
    assert "NEXT_STEP" in MultiSpinVectorEnv.__doc__ and "SAME_STEP" in MultiSpinVectorEnv.__doc__
    n = 3
    native = gym.make_vec(ENV, num_envs=n, horizon_s=1.0, num_users=5)
    assert native.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    sync = gym.make_vec(
        ENV,
        num_envs=n,
        vectorization_mode="sync",
        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
        horizon_s=1.0,
        num_users=5,
    )
    default_sync = gym.make_vec(ENV, num_envs=n, vectorization_mode="sync", horizon_s=1.0)
    assert default_sync.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    o1, _ = native.reset(seed=4)
    o2, _ = sync.reset(seed=4)
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    resets = 0
    for _ in range(25):
        a = rng.uniform(-0.5, 0.3, (n, 10)).astype(np.float32)
        s1, s2 = native.step(a), sync.step(a)
        for x, y in zip(s1[:4], s2[:4], strict=True):
            np.testing.assert_array_equal(x, y)
        if s1[3].any():
            resets += 1
            done = s1[3]
            final_sync = np.stack(s2[4]["final_obs"][done])  # an object array of rows
            np.testing.assert_array_equal(s1[4]["final_obs"][done], final_sync)
    assert resets >= 2
