"""The token-level confidence/acceptance fit (multispin_eval.fit_token_model)."""

import numpy as np
import pytest

from multispin_eval.fit_token_model import (
    fit_logit_model,
    fit_tokens,
    mean_acceptance,
    simulate_model,
    solve_mean_logit,
)


@pytest.mark.parametrize("alpha,s,sigma", [(0.6, 0.7, 1.8), (0.8, 1.5, 0.8), (0.4, 1.0, 3.0)])
def test_estimator_recovers_known_parameters(alpha, s, sigma):
    a, c = simulate_model(alpha, s, sigma, 40_000, np.random.default_rng(1))
    assert abs(a.mean() - alpha) < 0.01  # m solved so that E[a] = alpha
    s_hat, sigma_hat, rho = fit_logit_model(a, c)
    assert s_hat == pytest.approx(s, rel=0.15)
    assert sigma_hat == pytest.approx(sigma, rel=0.15)
    assert rho == pytest.approx(s / np.hypot(s, sigma), rel=0.15)


def test_estimator_edge_cases_and_scale_invariance():
    a, c = simulate_model(0.7, 1.0, 1.0, 5000, np.random.default_rng(2))
    base = fit_logit_model(a, c)
    lc = np.log(c) - np.log1p(-c)
    rescaled = 1.0 / (1.0 + np.exp(-(0.5 * lc - 0.3)))  # affine in logit space
    assert fit_logit_model(a, rescaled) == pytest.approx(base, rel=1e-6)
    assert fit_logit_model(a, a)[1] == pytest.approx(0.0, abs=1e-6)  # c = a: no noise
    shuffled = np.random.default_rng(3).permutation(c)
    assert fit_logit_model(a, shuffled)[1] > 10.0  # unrelated confidence: huge noise
    assert solve_mean_logit(0.5, 2.0) == pytest.approx(0.0, abs=1e-9)
    assert mean_acceptance(solve_mean_logit(0.9, 1.3), 1.3) == pytest.approx(0.9, abs=1e-9)


def test_fit_on_a_few_tokens_of_the_builtin_pair():
    torch = pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from multispin_env.live.models import load_pair
    from multispin_eval.fit_token_model import collect_tokens

    torch.set_num_threads(1)
    pair = load_pair()
    tokens = collect_tokens(pair, n_prompts=3, gen_tokens=32, stride=4, draft_len=8)
    assert tokens["a"].size == 3 * 9 * 8
    assert np.all((tokens["a"] >= 0) & (tokens["a"] <= 1 + 1e-9))
    assert np.all(tokens["entropy"] >= 0) and np.all(tokens["top_prob"] <= 1 + 1e-9)
    res = fit_tokens(tokens, n_sim=20_000)
    assert res["token_logit_std"] > 0
    assert res["confidence_noise_std"] >= 0 and np.isfinite(res["confidence_noise_std"])
    assert 0 < res["alpha_mean"] < 1
    assert res["proxy"] in ("adaedl_entropy", "top_prob")
    assert res["n_tokens"] == tokens["a"].size
    table = res["check_table"]
    assert table[0]["quantile"] == 0 and table[0]["mean_a_model"] == pytest.approx(
        res["alpha_mean"], abs=0.02
    )
