"""The position-dependent acceptance model (ScenarioConfig.acceptance_position_factors)."""

import numpy as np
import pytest

from multispin_env.config import TaskSpec, load_preset
from multispin_env.simulator import MultiSpinSimulator

ROUNDS = 40_000


def _accepted(factors, alpha=0.6, length=4, seed=0):
    cfg = load_preset(
        "demo-pair-cpu",
        num_users=1,
        tasks=[TaskSpec("t", alpha)],
        acceptance_position_factors=factors,
    )
    sim = MultiSpinSimulator(cfg, num_envs=ROUNDS)
    sim.reset(np.random.default_rng(seed).integers(0, 2**63, size=ROUNDS, dtype=np.uint64))
    result = sim.step(np.full((ROUNDS, 1), length), np.full((ROUNDS, 1), cfg.bandwidth_hz))
    return result.accepted[:, 0], result.expected_tokens[:, 0]


def test_survival_is_the_product_of_the_conditional_acceptances():
    alpha, factors = 0.6, [1.0, 0.5, 1.5]  # the last factor repeats: a_4 = a_3
    accepted, expected = _accepted(factors, alpha)
    conditional = [min(alpha * c, 0.999) for c in (1.0, 0.5, 1.5, 1.5)]
    survival = np.cumprod(conditional)
    for j in range(1, 5):
        assert np.mean(accepted >= j) == pytest.approx(survival[j - 1], abs=0.01)
    np.testing.assert_allclose(expected, 1 + survival.sum())
    assert accepted.max() <= 4


def test_unit_factors_are_the_iid_law_draw_for_draw():
    iid, iid_expected = _accepted([], 0.7, 6, seed=3)
    ones, ones_expected = _accepted([1.0], 0.7, 6, seed=3)
    assert np.mean(iid == ones) > 0.999  # the same uniform, inverted two ways
    np.testing.assert_allclose(ones_expected, iid_expected, rtol=1e-9)


def test_a_conditional_acceptance_never_reaches_one():
    accepted, _ = _accepted([1.0, 100.0], 0.9, 8)
    # a_i = 0.999 after the first token, so drafts are not all accepted for sure
    assert np.mean(accepted == 8) == pytest.approx(0.9 * 0.999**7, abs=0.01)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"acceptance_position_factors": [0.9, 1.0]}, "the first one 1.0"),
        ({"acceptance_position_factors": [1.0, -1.0]}, "(0, 100]"),
        ({"acceptance_position_factors": [1.0, float("nan")]}, "finite"),
        ({"acceptance_position_factors": [1.0], "early_stop": True}, "synchronous round"),
    ],
)
def test_bad_factors_name_the_field(overrides, words):
    with pytest.raises(ValueError, match="acceptance_position_factors") as err:
        load_preset("demo-pair-cpu", **overrides)
    assert words in str(err.value)
