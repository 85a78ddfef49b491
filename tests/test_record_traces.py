"""`multispin record-traces`: token-level traces of the built-in pair, and what they must mean."""

import json

import numpy as np
import pytest

from multispin_eval.record_traces import ROUND_COLUMNS, TOKEN_COLUMNS, main, summarise


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    manifest = main(
        ["--per-category", "3", "--rounds", "3", "--lengths", "1", "3", "--out", str(out),
         "--quiet"]
    )  # fmt: skip
    tokens = dict(np.load(out / "tokens.npz"))
    rounds = dict(np.load(out / "rounds.npz"))
    return out, manifest, tokens, rounds


def test_columns_manifest_and_report(traces):
    out, manifest, tokens, rounds = traces
    assert set(tokens) == set(TOKEN_COLUMNS) and set(rounds) == set(ROUND_COLUMNS)
    n = len(tokens["mode"])
    assert n == manifest["tokens"] > 0 and all(len(v) == n for v in tokens.values())
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["pair"]["manifest_sha256"] and len(saved["pair"]["manifest_sha256"]) == 64
    assert saved["categories"] and saved["versions"]["torch"]
    assert "P(i accepted)" in (out / "report.md").read_text()
    # every round drafted L tokens per request: 2 modes x (1 + 3) tokens x rounds x requests
    assert n == 2 * (1 + 3) * 3 * saved["requests"]
    assert np.all(rounds["users"] == saved["requests"]) and np.all(rounds["verify_s"] > 0)


def test_every_draft_is_an_accepted_prefix_and_greedy_acceptance_is_the_argmax(traces):
    _, _, tokens, _ = traces
    for length in (1, 3):
        for mode in (0, 1):
            sel = (tokens["draft_length"] == length) & (tokens["mode"] == mode)
            accepted = tokens["accepted"][sel].reshape(-1, length)
            reached = tokens["reached"][sel].reshape(-1, length)
            position = tokens["position"][sel].reshape(-1, length)
            assert np.all(position == np.arange(1, length + 1))
            # accepted positions form a prefix, and the rule looked one past it
            m = accepted.sum(axis=1)
            assert np.all(accepted == (np.arange(length) < m[:, None]))
            assert np.all(reached == (np.arange(length) <= m[:, None]))
            prob = tokens["accept_prob"][sel].reshape(-1, length)
            assert np.all((prob >= 0) & (prob <= 1 + 1e-6))
            if mode == 0:  # greedy: accepted exactly while the draft is the verifier's argmax
                assert set(np.unique(prob)) <= {0.0, 1.0}
                first_miss = np.where(prob == 0, np.arange(length), length).min(axis=1)
                np.testing.assert_array_equal(m, first_miss)
    assert np.all(tokens["entropy"] >= 0)
    assert np.all((tokens["top_prob"] > 0) & (tokens["top_prob"] <= 1))


def test_summary_tokens_per_round_is_accepted_plus_one(traces):
    _, _, tokens, _ = traces
    rows = {(r["mode"], r["L"]): r for r in summarise(tokens)}
    sel = (tokens["mode"] == 1) & (tokens["draft_length"] == 3)
    m = tokens["accepted"][sel].reshape(-1, 3).sum(axis=1)
    assert rows[("sampling", 3)]["tokens_per_round"] == pytest.approx(m.mean() + 1)
    alpha = rows[("sampling", 3)]["alpha"]
    assert rows[("sampling", 3)]["iid_per_position"] == pytest.approx([alpha, alpha**2, alpha**3])


def test_bad_flags_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--per-category", "2"])
    assert ">= 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--hf-drafter", "x"])


def test_position_model_fit_and_the_simulator_reproduce_the_traces(traces, monkeypatch):
    """The factors fitted on a trace set, played by the simulator, give back the set's own
    per-position acceptance (in sample; the README's check is on a held-out set)."""
    import multispin_eval.acceptance_fidelity as fidelity
    from multispin_eval.record_traces import fit_position_model

    _, manifest, tokens, _ = traces
    fit = fit_position_model(tokens, pseudo_counts=0.0)
    assert fit == fit_position_model(tokens, pseudo_counts=0.0)  # deterministic
    for model in fit.values():
        assert model["factors"][0] == 1.0 and len(model["factors"]) == 3
    monkeypatch.setattr(fidelity, "ROUNDS", 4000)
    rows = fidelity.compare(fit, tokens)
    assert {(r["mode"], r["L"]) for r in rows} == {(m, n) for m in ("greedy", "sampling")
                                                 for n in (1, 3)}  # fmt: skip
    for r in rows:
        model = fit[r["mode"]]
        factors = model["factors"] + [model["factors"][-1]] * r["L"]
        survival = np.cumprod([min(model["alpha_1"] * c, 0.999) for c in factors[: r["L"]]])
        # the simulator plays the fitted law (4,000 rounds: +-0.03) ...
        assert r["position_per_position"] == pytest.approx(survival, abs=0.03)
        assert r["iid_per_position"] == pytest.approx(
            model["alpha_1"] ** np.arange(1, r["L"] + 1), abs=0.03
        )
        # ... against the traces' own survival
        mode = 0 if r["mode"] == "greedy" else 1
        sel = (tokens["mode"] == mode) & (tokens["draft_length"] == r["L"])
        m = tokens["accepted"][sel].reshape(-1, r["L"]).sum(axis=1)
        assert r["live_per_position"] == pytest.approx(
            [np.mean(m >= i) for i in range(1, r["L"] + 1)]
        )
    assert manifest["position_model"].keys() == fit.keys()
