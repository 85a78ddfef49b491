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


def test_one_mode_records_only_that_mode_and_matches_the_both_modes_run(traces, tmp_path):
    """--modes greedy: the greedy half of a both-modes run with the same seed, token for
    token (greedy drafts do not depend on the sampling half)."""
    _, _, both, _ = traces
    main(
        ["--per-category", "3", "--rounds", "3", "--lengths", "1", "3", "--modes", "greedy",
         "--out", str(tmp_path), "--quiet"]
    )  # fmt: skip
    greedy = dict(np.load(tmp_path / "tokens.npz"))
    assert set(np.unique(greedy["mode"])) == {0}
    sel = both["mode"] == 0
    for column in ("request", "round", "position", "token", "accepted"):
        np.testing.assert_array_equal(greedy[column], both[column][sel])


def _iid_tokens(alpha: float, requests: int, rounds: int, lengths, seed: int) -> dict:
    """Trace columns of a pair whose every drafted token passes with probability alpha,
    independently: the i.i.d. law holds exactly."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("mode", "draft_length", "request", "position", "accepted")}
    for r in range(requests):
        for length in lengths:
            for _ in range(rounds):
                passed = np.cumprod(rng.random(length) < alpha).astype(bool)
                cols["mode"] += [1] * length
                cols["draft_length"] += [length] * length
                cols["request"] += [r] * length
                cols["position"] += list(range(1, length + 1))
                cols["accepted"] += passed.tolist()
    return {k: np.asarray(v) for k, v in cols.items()}


def test_split_check_passes_an_iid_pair_and_fails_a_shifted_pool(tmp_path):
    """Random halves of i.i.d. traces meet both targets in every split; pooling two sets
    whose requests differ (alpha 0.45 vs 0.75) makes the halves' mixtures differ, which the
    check must see as larger gaps than within one set."""
    from multispin_eval.acceptance_fidelity import pooled_tokens, split_check

    # 160 requests x 40 rounds: 3,200 rounds per half and length, P(i) to about +-0.009
    same = split_check(_iid_tokens(0.6, 160, 40, (1, 2, 4), seed=0), splits=3)
    assert same["requests"] == 160 and same["splits"] == 3
    assert same["modes"]["sampling"]["splits_meeting_both_targets"] == 3
    for i, alpha in enumerate((0.45, 0.75)):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        np.savez(folder / "tokens.npz", **_iid_tokens(alpha, 4, 20, (1, 2, 4), seed=i + 1))
    pooled = pooled_tokens([str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert len(np.unique(pooled["request"])) == 8  # request ids kept apart per set
    mixed = split_check(pooled, splits=6)
    gap = mixed["modes"]["sampling"]["max_position_gap"]["median"]
    assert gap > same["modes"]["sampling"]["max_position_gap"]["median"]


def test_designated_check_reports_targets_per_decoding_mode(tmp_path, capsys):
    from multispin_eval.acceptance_fidelity import main as fidelity_main
    from multispin_eval.record_traces import fit_position_model

    fit, heldout = tmp_path / "fit", tmp_path / "heldout"
    fit.mkdir()
    heldout.mkdir()
    fit_tokens = _iid_tokens(0.6, 80, 40, (1, 2, 4), seed=10)
    (fit / "manifest.json").write_text(
        json.dumps({"position_model": fit_position_model(fit_tokens)})
    )
    (heldout / "manifest.json").write_text("{}")
    np.savez(heldout / "tokens.npz", **_iid_tokens(0.6, 80, 40, (1, 2, 4), seed=11))
    fidelity_main(["--fit", str(fit), "--heldout", str(heldout)])
    met = json.loads((heldout / "fidelity.json").read_text())["targets_met"]
    assert met == {"sampling": {"per_position_0.05": True, "tokens_per_round_5pct": True}}
    assert "sampling: every position within 0.05: True" in capsys.readouterr().out
