"""Safe policy improvement: deploy a residual policy only where it beats its base heuristic.

    python -m multispin_train.gate runs/experiments/realistic/s0 [--episodes 256]

A residual policy (``action_mode=residual``) corrects a base heuristic; its zero action *is*
the base. Model selection during training (``best_model.zip``) picks the best of a handful of
evaluations on 16 episodes, so part of what it keeps is the luck of those episodes: on fresh
episodes the selected corrections were measured to move goodput by -1.1 ... +0.6 %. The gate
is the safety test of high-confidence policy improvement (Thomas et al., ICML 2015): the
candidate was chosen on one set of episodes, and it is tested against its base on another,
fresh set (``GATE_SEED_START``, disjoint from training, model selection, tuning and the
held-out evaluation sets). It is deployed only if the lower end of the paired 95 % CI of the
per-episode goodput ratio candidate / base is above ``1 + min_gain``; otherwise the deployed
policy is the candidate with its output layer zeroed, which decides exactly as the base
heuristic. Either way the run directory gets ``deployed_model.zip`` (what export and the
comparisons use) and ``gate.json`` (the test and its outcome).

The gate cannot make a policy better than its base; it makes "learned" never deploy a
correction that has not shown a gain on episodes it was not chosen on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# fresh episodes for the safety test: training uses seed + 0.., model selection seed + 1e6,
# the held-out evaluations 2e6+ and 2.1e6+, tuning 3e6+
GATE_SEED_START = 4_000_000
DEPLOYED_MODEL = "deployed_model.zip"
GATE_FILE = "gate.json"


def gate_episodes_arg(text: str) -> int:
    """argparse type of the ``--gate-episodes`` flags: 0 turns the gate off; otherwise at
    least 2 episodes, the fewest a paired confidence interval can be built from."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError("must be 0 (no gate) or >= 2")
    return value


def _output_layers(model) -> list:
    """The layers that emit the mean action of an actor-critic policy."""
    from torch import nn

    policy = model.policy
    action_net = getattr(policy, "action_net", None)
    if action_net is None:
        raise ValueError(
            f"{type(model).__name__} has no action_net: the gate's fallback needs an "
            "actor-critic policy (ppo or a2c)"
        )
    if isinstance(action_net, nn.Linear):
        return [action_net]
    # the per-user policy: its heads emit the action parameters (action_net = Identity)
    extractor = policy.mlp_extractor
    layers = [extractor.actor_head[-1]]
    if getattr(extractor, "global_head", None) is not None:
        layers.append(extractor.global_head[-1])
    return layers


def zero_residual(model) -> None:
    """Zero the layer that emits the mean action, in place: the deterministic action becomes
    exactly 0, which for ``residual`` actions is the base heuristic's own decision."""
    import torch

    with torch.no_grad():
        for layer in _output_layers(model):
            layer.weight.zero_()
            layer.bias.zero_()


def _paired_ratio(candidate: np.ndarray, base: np.ndarray) -> dict:
    from multispin_eval.stats import ci95_halfwidth

    ratio = candidate / base
    mean, half = float(ratio.mean()), ci95_halfwidth(ratio)
    return {"mean": mean, "ci95": [mean - half, mean + half], "episodes": len(ratio)}


def gate_decision(candidate: np.ndarray, base: np.ndarray, min_gain: float = 0.0) -> dict:
    """The safety test on per-episode goodputs (same episodes, common random numbers)."""
    candidate, base = np.asarray(candidate, float), np.asarray(base, float)
    if candidate.shape != base.shape or candidate.ndim != 1 or len(candidate) < 2:
        raise ValueError("the gate needs >= 2 paired episodes of candidate and base goodput")
    test = _paired_ratio(candidate, base)
    test["deployed"] = "candidate" if test["ci95"][0] > 1.0 + min_gain else "base"
    test["min_gain"] = min_gain
    return test


def base_of(run_dir: str | Path, model_file: str = "best_model.zip"):
    """(candidate controller, base heuristic, the run's env kwargs without its action mode
    and base) of a residual run whose policy the gate can fall back from."""
    from multispin_eval.harness import LearnedController

    config = Path(run_dir) / "config.json"
    try:
        candidate = LearnedController(run_dir, model_file)
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not a readable training config ({e!r})") from None
    base_policy = candidate.env_kwargs.get("base_policy")
    if candidate.env_kwargs.get("action_mode") != "residual" or not base_policy:
        raise ValueError(
            f"{run_dir} was not trained with action_mode=residual and a base_policy: the gate "
            "tests corrections to a base heuristic, and falls back to that base"
        )
    _output_layers(candidate.model)  # refuse a policy the gate could not fall back from now
    # everything else the run set (scenario overrides, horizon, history decay) applies to
    # the base too: both must play the same episodes
    plain = {
        key: value
        for key, value in candidate.env_kwargs.items()
        if key not in ("action_mode", "base_policy")
    }
    return candidate, base_policy, plain


def base_goodput(
    env_id: str, base_policy: str, seeds: list[int], env_kwargs: dict | None = None
) -> np.ndarray:
    """Per-episode goodput of a base heuristic in the plain env, with the run's other env
    kwargs (shared by every seed's gate)."""
    from multispin_eval.compare import make_controller
    from multispin_eval.harness import run_episodes

    ctrl = make_controller(base_policy, env_id)
    return run_episodes(ctrl, env_id, seeds, env_kwargs=env_kwargs).goodput


def gate_run(
    run_dir: str | Path,
    episodes: int = 256,
    model_file: str = "best_model.zip",
    min_gain: float = 0.0,
    base_scores: np.ndarray | None = None,
) -> dict:
    """Test ``run_dir/model_file`` against the run's base heuristic on ``episodes`` fresh
    episodes; write ``deployed_model.zip`` and ``gate.json``; return the test's record."""
    from multispin_eval.harness import run_episodes

    run_dir = Path(run_dir)
    if episodes < 2:
        raise ValueError(f"--episodes must be >= 2 (got {episodes})")
    if not (np.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"--min-gain must be a finite number >= 0 (got {min_gain})")
    candidate, base_policy, plain = base_of(run_dir, model_file)
    seeds = list(range(GATE_SEED_START, GATE_SEED_START + episodes))
    env_id = candidate.env_id
    if base_scores is None:
        base_scores = base_goodput(env_id, base_policy, seeds, plain)
    scores = run_episodes(candidate, env_id, seeds).goodput
    record = gate_decision(scores, base_scores, min_gain)
    record |= {
        "candidate": str(run_dir / model_file),
        "base_policy": base_policy,
        "env_id": env_id,
        "seeds": [seeds[0], seeds[-1]],
    }
    model = candidate.model
    if record["deployed"] == "base":
        zero_residual(model)
    model.save(run_dir / DEPLOYED_MODEL)
    (run_dir / GATE_FILE).write_text(json.dumps(record, indent=2))
    return record


def describe(record: dict) -> str:
    lo, hi = record["ci95"]
    return (
        f"candidate / base = {record['mean']:.4f} [{lo:.4f}, {hi:.4f}] on "
        f"{record['episodes']} fresh episodes: deployed the {record['deployed']}"
    )


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m multispin_train.gate", description=__doc__)
    p.add_argument("runs", nargs="+", help="training run directories (residual actions)")
    p.add_argument("--episodes", type=int, default=256, help="fresh episodes for the test")
    p.add_argument("--model", default="best_model.zip", help="the candidate in each run")
    p.add_argument(
        "--min-gain", type=float, default=0.0, help="the CI's lower end must exceed 1 + this"
    )
    a = p.parse_args(argv)
    if a.episodes < 2:
        p.error("--episodes must be >= 2")
    records = []
    for run in a.runs:
        try:
            record = gate_run(run, a.episodes, a.model, a.min_gain)
        except ValueError as e:
            p.exit(2, f"multispin gate: {e}\n")
        print(f"{run}: {describe(record)}")
        records.append(record)
    return records


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
