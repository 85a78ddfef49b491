"""The paper's algorithms: closed forms, structural claims (Lemmas, Remarks), optimality."""

import numpy as np
import pytest
from scipy.special import lambertw

from multispin_agents import (
    brute_force_oracle,
    cen_spin,
    fixed_bw_and_length,
    hete_multispin,
    homo_multispin,
    homo_optimal_length,
    latency_equalising_bandwidth,
    p2p_spin,
    uni_bw_multispin,
)
from multispin_agents.lambertw import lambertw0, lambertw0_from_log
from multispin_agents.solvers import equalising_latency, evaluate_goodput
from multispin_env.physics import expected_tokens

Q = 31744.0


def random_instance(rng, k):
    return dict(
        alpha=rng.uniform(0.5, 0.95, k),
        t_draft_s=rng.uniform(0.01, 0.04, k),
        spectral_eff=rng.uniform(0.5, 9.0, k),
        payload_bits=Q,
        bandwidth_hz=float(rng.uniform(1e6, 20e6)),
        t_ver_s=float(rng.uniform(0.03, 0.4)),
    )


def test_lambertw0_matches_scipy_over_many_decades():
    z = np.geomspace(1e-200, 1e200, 801)
    np.testing.assert_allclose(lambertw0(z), lambertw(z).real, rtol=1e-12)
    w = lambertw0_from_log(np.array([2000.0, 5000.0]))  # z far beyond float range
    np.testing.assert_allclose(w + np.log(w), [2000.0, 5000.0], rtol=1e-13)


def test_equalising_latency_solves_lemma3_and_bandwidth_sums_to_budget():
    rng = np.random.default_rng(0)
    for _ in range(20):
        inst = random_instance(rng, 12)
        lengths = rng.integers(1, 15, 12)
        bw, phi = latency_equalising_bandwidth(
            lengths, inst["t_draft_s"], inst["spectral_eff"], Q, inst["bandwidth_hz"]
        )
        assert bw.sum() == pytest.approx(inst["bandwidth_hz"], rel=1e-12)
        assert np.all(bw > 0)
        per_user = lengths * (inst["t_draft_s"] + Q / (bw * inst["spectral_eff"]))
        np.testing.assert_allclose(per_user, phi, rtol=1e-9)  # every user finishes together
    # vectorised over leading axes
    a, c = rng.uniform(1, 2, (3, 4, 5)), rng.uniform(0, 1, (3, 4, 5))
    phi = equalising_latency(a, c, 10.0)
    np.testing.assert_allclose((a / (phi[..., None] - c)).sum(-1), 10.0, rtol=1e-10)


def test_lemma1_gives_weaker_users_more_bandwidth():
    t = np.full(5, 0.02)
    r = np.array([1.0, 2.0, 4.0, 6.0, 8.0])
    bw, theta = latency_equalising_bandwidth(np.ones(5), t, r, Q, 10e6)
    assert np.all(np.diff(bw) < 0)  # worse channel -> more bandwidth
    slow = np.array([0.04, 0.03, 0.02, 0.015, 0.01])
    bw2, _ = latency_equalising_bandwidth(np.ones(5), slow, np.full(5, 4.0), Q, 10e6)
    assert np.all(np.diff(bw2) < 0)  # slower drafter -> more bandwidth


def test_theorem1_closed_form_matches_exhaustive_search():
    rng = np.random.default_rng(1)
    for _ in range(300):
        alpha = rng.uniform(0.3, 0.98)
        theta = rng.uniform(0.005, 0.1)
        t_ver = rng.uniform(0.01, 0.5)
        lengths = np.arange(1, 101)
        tau = (1 - alpha ** (lengths + 1)) / (lengths * theta + t_ver)
        _, best = homo_optimal_length(alpha, theta, t_ver, 100)
        assert best == lengths[np.argmax(tau)]


def test_theorem1_worked_example_from_paper_notes():
    # GSM8K alpha = 0.739, T^ver = 277 ms: L~* = 5.34, 4.13, 3.30, 2.36 for theta = 20..80 ms
    relaxed = [homo_optimal_length(0.739, th, 0.27708, 25)[0] for th in (0.02, 0.034, 0.05, 0.08)]
    np.testing.assert_allclose(relaxed, [5.34, 4.13, 3.30, 2.36], atol=0.01)


def test_remark1_monotonicity_of_optimal_length():
    t_vers = np.linspace(0.1, 0.4, 16)
    lens = [homo_optimal_length(0.8, 0.03, t, 100)[0] for t in t_vers]
    assert np.all(np.diff(lens) > 0)  # increases with T^ver
    thetas = np.linspace(0.02, 0.08, 16)
    lens = [homo_optimal_length(0.8, th, 0.277, 100)[0] for th in thetas]
    assert np.all(np.diff(lens) < 0)  # decreases with theta*
    alphas = np.linspace(0.6, 0.9, 16)
    lens = [homo_optimal_length(a, 0.03, 0.277, 100)[0] for a in alphas]
    assert np.all(np.diff(lens) > 0)  # increases with alpha


def test_homo_equals_theorem1_for_common_alpha():
    rng = np.random.default_rng(2)
    for _ in range(30):
        inst = random_instance(rng, 8)
        inst["alpha"] = np.full(8, rng.uniform(0.55, 0.95))
        alloc = homo_multispin(**inst, max_draft_length=25)
        _, theta = latency_equalising_bandwidth(
            np.ones(8), inst["t_draft_s"], inst["spectral_eff"], Q, inst["bandwidth_hz"]
        )
        _, best = homo_optimal_length(inst["alpha"][0], float(theta), inst["t_ver_s"], 25)
        assert np.all(alloc.draft_lengths == best)


def test_remark2_higher_acceptance_gets_longer_drafts_and_more_bandwidth():
    alpha = np.array([0.55, 0.65, 0.75, 0.85, 0.95])
    alloc = hete_multispin(alpha, np.full(5, 0.02), np.full(5, 5.0), Q, 5e6, 0.1, 25)
    assert (
        np.all(np.diff(alloc.draft_lengths) >= 0)
        and alloc.draft_lengths[-1] > alloc.draft_lengths[0]
    )
    assert (
        np.all(np.diff(alloc.bandwidth_hz) >= -1e-6)
        and alloc.bandwidth_hz[-1] > alloc.bandwidth_hz[0]
    )


@pytest.mark.parametrize("polish", [True, False])
def test_hete_within_half_percent_of_brute_force(polish):
    rng = np.random.default_rng(3)
    ratios = []
    for trial in range(40):
        k = 3 if trial % 2 else 4
        l_max = 12 if k == 3 else 8
        inst = random_instance(rng, k)
        oracle = brute_force_oracle(**inst, max_draft_length=l_max)
        hete = hete_multispin(**inst, max_draft_length=l_max, polish=polish)
        ratios.append(hete.goodput_tokens_per_s / oracle.goodput_tokens_per_s)
        # the reported goodput is the true model goodput of the returned decision
        assert hete.goodput_tokens_per_s == pytest.approx(
            evaluate_goodput(
                inst["alpha"],
                inst["t_draft_s"],
                inst["spectral_eff"],
                Q,
                hete.draft_lengths,
                hete.bandwidth_hz,
                inst["t_ver_s"],
            ),
            rel=1e-9,
        )
    assert min(ratios) >= 0.995
    assert max(ratios) <= 1 + 1e-9  # nothing beats the oracle


def test_scheme_ordering_on_random_instances():
    rng = np.random.default_rng(4)
    for _ in range(25):
        inst = random_instance(rng, 20)
        fixed = fixed_bw_and_length(**inst, max_draft_length=25).goodput_tokens_per_s
        uni = uni_bw_multispin(**inst, max_draft_length=25).goodput_tokens_per_s
        homo = homo_multispin(**inst, max_draft_length=25).goodput_tokens_per_s
        hete = hete_multispin(**inst, max_draft_length=25).goodput_tokens_per_s
        # Hete optimises over a superset of every other scheme's decisions
        assert hete >= max(fixed, uni, homo) * (1 - 1e-9)


def test_uni_bw_is_exact_over_equal_bandwidth_decisions():
    rng = np.random.default_rng(5)
    for _ in range(15):
        inst = random_instance(rng, 3)
        alloc = uni_bw_multispin(**inst, max_draft_length=10)
        bw = np.full(3, inst["bandwidth_hz"] / 3)
        best = max(
            evaluate_goodput(
                inst["alpha"],
                inst["t_draft_s"],
                inst["spectral_eff"],
                Q,
                np.array(ls),
                bw,
                inst["t_ver_s"],
            )
            for ls in np.ndindex(10, 10, 10)
            for ls in [np.array(ls) + 1]
        )
        assert alloc.goodput_tokens_per_s == pytest.approx(best, rel=1e-12)
        np.testing.assert_allclose(alloc.bandwidth_hz, bw)


def test_fixed_baseline_hand_value():
    alloc = fixed_bw_and_length(
        np.array([0.5, 0.5]), np.array([0.01, 0.01]), np.array([1.0, 1.0]), 1000.0, 2e5, 0.1, 25
    )
    assert list(alloc.draft_lengths) == [8, 8]
    per_user = 8 * (0.01 + 1000.0 / (1e5 * 1.0))
    tokens = 2 * (1 - 0.5**9) / 0.5
    assert alloc.goodput_tokens_per_s == pytest.approx(tokens / (per_user + 0.1))


def test_p2p_and_cen_single_user_hand_values():
    alpha = np.array([0.8])
    good, lengths = p2p_spin(alpha, np.array([0.02]), np.array([4.0]), Q, 10e6, 0.035, 25)
    per_token = 0.02 + Q / (10e6 * 4.0)
    ls = np.arange(1, 26)
    taus = expected_tokens(0.8, ls) / (ls * per_token + 0.035)
    assert lengths[0] == ls[np.argmax(taus)] and good == pytest.approx(taus.max())
    good_c, _ = cen_spin(alpha, 0.005, 0.035, 25)
    assert good_c == pytest.approx((expected_tokens(0.8, ls) / (ls * 0.005 + 0.035)).max())


def test_solvers_reject_bad_instances():
    with pytest.raises(ValueError, match="alpha"):
        hete_multispin(np.array([1.2]), np.array([0.02]), np.array([3.0]), Q, 1e6, 0.1, 25)
    with pytest.raises(ValueError, match="equal length"):
        homo_multispin(np.ones(3) * 0.7, np.ones(2) * 0.02, np.ones(3), Q, 1e6, 0.1, 25)
    with pytest.raises(ValueError, match="max_combinations"):
        brute_force_oracle(np.full(8, 0.7), np.full(8, 0.02), np.full(8, 3.0), Q, 1e6, 0.1, 25)
