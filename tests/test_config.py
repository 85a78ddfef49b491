"""Configuration validation and presets."""

import pytest

from multispin_env.config import ScenarioConfig, TaskSpec, load_preset, preset_names


def test_presets_load_and_carry_paper_values():
    assert {"paper-llama2", "paper-qwen35", "realistic-llama2"} <= set(preset_names())
    cfg = load_preset("paper-llama2")
    assert cfg.num_users == 20 and cfg.bandwidth_hz == 10e6 and cfg.max_draft_length == 25
    assert cfg.payload_bits == 31744
    assert [t.alpha_mean for t in cfg.tasks] == [0.8582, 0.7390, 0.7393, 0.7126]
    assert cfg.verification_model.latency_for_batch_s(20, 8) == pytest.approx(0.27708)
    qwen = load_preset("paper-qwen35")
    assert qwen.verification_model.latency_for_batch_s(20, 8) == pytest.approx(0.47067)
    # paper presets keep every realism option off
    for c in (cfg, qwen):
        assert not c.per_request_acceptance and c.request_length_tokens == 0
        assert c.csi_error_std == 0 and c.draft_energy_j_per_token == 0


def test_overrides_are_validated():
    cfg = load_preset("paper-llama2", num_users=10, bandwidth_hz=5e6)
    assert cfg.num_users == 10 and cfg.bandwidth_hz == 5e6
    with pytest.raises(ValueError, match="bandwidth_hz"):
        cfg.with_overrides(bandwidth_hz=-1.0)
    with pytest.raises(ValueError, match="num_users"):
        load_preset("paper-llama2", num_users=0)


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ValueError, match="did you mean 'bandwidth_hz'"):
        load_preset("paper-llama2", bandwith_hz=1e6)
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("no-such-preset")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("t_draft_spread", 1.5, "t_draft_spread"),
        ("mean_gain_high", 0.1, "mean_gain_high"),
        ("kept_vocab", 10**6, "kept_vocab"),
        ("max_draft_length", 0, "max_draft_length"),
        ("request_length_tokens", 0.5, "request_length_tokens"),
        ("csi_error_std", -0.1, "csi_error_std"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ScenarioConfig(**{field: value})


def test_task_spec_checks_beta_feasibility():
    with pytest.raises(ValueError, match="alpha_std"):
        TaskSpec("x", 0.9, 0.5)  # std must be < sqrt(0.9 * 0.1) = 0.3
    a, b = TaskSpec("x", 0.739, 0.3133).beta_params
    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    assert mean == pytest.approx(0.739) and var == pytest.approx(0.3133**2)


def test_round_trip_to_dict():
    cfg = load_preset("realistic-llama2")
    assert ScenarioConfig.from_dict(cfg.to_dict()) == cfg


def test_realistic_preset_splits_the_paper_slope_as_the_gpu_measurement_does():
    """realistic-llama2's verifier: Fig. 5's 12.72 ms/user slope at L = 5, split between
    users and padded tokens in the ratio the committed H200 fit of the Llama-2-7B shape
    shows (not the CPU pair's split, which made long drafts look far too expensive)."""
    import json
    from pathlib import Path

    fit_path = Path(__file__).parents[1] / "results/gpu_verify/verify_latency_graph.json"
    fit = json.loads(fit_path.read_text())["models"]["llama2-7b"]["forward_cuda_graph"]["fit"]
    gpu = fit["token_aware"]
    gpu_token_frac = 6 * gpu["t_token_s"] / (gpu["t_user_s"] + 6 * gpu["t_token_s"])
    ver = load_preset("realistic-llama2").verification
    slope = ver["t_user_s"] + 6 * ver["t_token_s"]
    assert slope == pytest.approx(0.01272, rel=2e-3)
    assert 6 * ver["t_token_s"] / slope == pytest.approx(gpu_token_frac, rel=0.02)
    assert 0.1 < gpu_token_frac < 0.3
    cpu = load_preset("realistic-llama2-cpu-verifier").verification
    assert 6 * cpu["t_token_s"] / (cpu["t_user_s"] + 6 * cpu["t_token_s"]) > 0.6
