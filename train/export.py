"""Export a trained run as a self-contained policy bundle (ONNX + JSON sidecar).

    multispin export runs/experiments/paper [--model best_model.zip] [--out BUNDLE_DIR]

The ONNX graph is the deterministic actor with the run's observation normalisation
(VecNormalize mean/var/clip) folded in, so it takes the raw observation the env's (and the
live server's) builder produces. Box actions are clipped to their bounds, discrete ones are
argmaxed, exactly as SB3's ``predict(deterministic=True)``. The export checks parity with the
SB3 policy on observations from the env and measures the decision latency of the bundle on
one core; both go into ``policy.json`` and are printed. Loading needs only numpy and
onnxruntime (:class:`multispin_agents.bundle.PolicyBundle`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from multispin_agents.bundle import (
    BUNDLE_FORMAT,
    METADATA_KEY,
    PolicyBundle,
    canonical_json,
    contract_of,
    integrity_sha256,
    validate_sidecar,
)


class DeterministicActor(nn.Module):
    """Raw observation -> deterministic action of an SB3 policy, normalisation folded in."""

    def __init__(self, model, obs_norm=None) -> None:
        super().__init__()
        from gymnasium import spaces

        self.policy = model.policy
        self.kind = type(model).__name__.lower()
        space = model.action_space
        self.discrete = None
        if isinstance(space, spaces.MultiDiscrete):
            self.discrete = [int(n) for n in space.nvec]
        elif isinstance(space, spaces.Discrete):
            self.discrete = [int(space.n)]
        else:
            self.register_buffer("low", torch.as_tensor(space.low, dtype=torch.float32))
            self.register_buffer("high", torch.as_tensor(space.high, dtype=torch.float32))
        self.normalize = obs_norm is not None and obs_norm.norm_obs
        if self.normalize:
            rms = obs_norm.obs_rms
            self.register_buffer("mean", torch.as_tensor(rms.mean, dtype=torch.float32))
            self.register_buffer(
                "std", torch.as_tensor(np.sqrt(rms.var + obs_norm.epsilon), dtype=torch.float32)
            )
            self.clip = float(obs_norm.clip_obs)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            obs = torch.clamp((obs - self.mean) / self.std, -self.clip, self.clip)
        if self.kind in ("sac", "td3"):
            return (
                self.policy.actor(obs, deterministic=True)
                if self.kind == "sac"
                else self.policy.actor(obs)
            )
        features = self.policy.pi_features_extractor(obs)
        out = self.policy.action_net(self.policy.mlp_extractor.forward_actor(features))
        if self.discrete is None:
            return torch.maximum(torch.minimum(out, self.high), self.low)
        chunks = torch.split(out, self.discrete, dim=1)
        return torch.stack([c.argmax(dim=1) for c in chunks], dim=1).float()


def _load_run(run_dir: Path, model_file: str | None):
    from multispin_eval.harness import LearnedController

    controller = LearnedController(run_dir, model_file)
    return controller.model, controller.obs_norm, controller.config


def _reference_observations(env_id: str, env_kwargs: dict, count: int, seed: int = 0):
    """Observations a deployment would produce: random play in the run's own env."""
    import gymnasium as gym

    import multispin_env  # noqa: F401

    env = gym.make(env_id, **env_kwargs).unwrapped
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    while len(out) < count:
        out.append(obs)
        obs, _, _, truncated, _ = env.step(env.action_space.sample())
        if truncated:
            obs, _ = env.reset()
    return np.stack(out).astype(np.float32), env


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    model_file: str | None = None,
    parity_samples: int = 256,
) -> Path:
    from multispin_eval.harness import default_model_file

    run_dir = Path(run_dir)
    model_file = model_file or default_model_file(run_dir)
    model, obs_norm, config = _load_run(run_dir, model_file)
    out = Path(out) if out else run_dir / "bundle"
    out.mkdir(parents=True, exist_ok=True)
    env_id, env_kwargs = config["env_id"], dict(config.get("env_kwargs", {}))
    env_kwargs.pop("reward_weights", None)
    observations, env = _reference_observations(env_id, env_kwargs, parity_samples)
    actor = DeterministicActor(model, obs_norm).eval()
    example = torch.as_tensor(observations[:1])
    buffer = io.BytesIO()
    torch.onnx.export(
        actor,
        (example,),
        buffer,
        input_names=["observation"],
        output_names=["action"],
        dynamic_axes={"observation": {0: "batch"}, "action": {0: "batch"}},
        dynamo=False,
    )
    graph = buffer.getvalue()
    import onnx
    import onnxruntime
    import stable_baselines3

    meta = {
        "format": BUNDLE_FORMAT,
        "env_id": env_id,
        "env_kwargs": env_kwargs,
        "algo": config["algo"],
        "source_model": str(run_dir / model_file),
        "action_mode": env.options.action_mode,
        "max_users": env.options.max_users,
        "max_draft_length": env.config.max_draft_length,
        "observation_size": int(observations.shape[1]),
        "action_size": int(np.prod(env.action_space.shape) or 1),
        "feature_names": list(env.feature_names),
        "config_sha256": hashlib.sha256((run_dir / "config.json").read_bytes()).hexdigest(),
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "stable_baselines3": stable_baselines3.__version__,
        },
    }
    levers = env._episodes.levers
    if levers.any:  # the extended protocol's lever entries follow the allocation's
        meta["protocol_levers"] = {
            "stop": bool(levers.stop),
            "deadline": bool(levers.deadline),
            "groups": int(levers.groups),
        }
    bundle = write_bundle(out, graph, meta)
    normed = obs_norm.normalize_obs(observations) if obs_norm is not None else observations
    reference, _ = model.predict(normed, deterministic=True)
    got = bundle.act(observations)
    meta["parity_max_abs_diff"] = float(np.max(np.abs(got.reshape(reference.shape) - reference)))
    meta["decision_latency_us"] = decision_latency_us(bundle, observations)
    write_bundle(out, graph, meta)  # the measurements become part of the signed contract
    return out


def write_bundle(out: str | Path, graph: bytes, meta: dict) -> PolicyBundle:
    """Write ``policy.onnx`` (``graph`` with the contract embedded as ONNX metadata) and
    ``policy.json`` (``meta`` plus ``onnx_sha256`` and ``integrity_sha256``), then load the
    result, so every check a deployment runs has passed once here."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = contract_of(meta)
    validate_contract = {**meta, "onnx_sha256": "0" * 64, "integrity_sha256": "0" * 64}
    validate_sidecar(validate_contract, "policy to export")
    model = onnx.load_from_string(graph)
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=METADATA_KEY, value=canonical_json(meta).decode())
    onnx_bytes = model.SerializeToString()
    meta["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    meta["integrity_sha256"] = integrity_sha256(onnx_bytes, meta)
    (out / "policy.onnx").write_bytes(onnx_bytes)
    (out / "policy.json").write_text(json.dumps(meta, indent=2))
    return PolicyBundle(out)


def decision_latency_us(bundle: PolicyBundle, observations: np.ndarray, calls: int = 1000) -> dict:
    """Median and p95 of one decision (one observation in, one action out), in µs."""
    one = observations[:1]
    for _ in range(50):
        bundle.act(one)
    times = []
    for i in range(calls):
        obs = observations[i % len(observations)][None]
        t0 = time.perf_counter()
        bundle.act(obs)
        times.append(time.perf_counter() - t0)
    return {
        "median": 1e6 * float(np.median(times)),
        "p95": 1e6 * float(np.percentile(times, 95)),
    }


def main(argv=None) -> Path:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(prog="multispin export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument(
        "--model",
        default=None,
        help="model file in the run (default: deployed_model.zip where the gate has run, "
        "else model.zip, the final one; best_model.zip is the selected one)",
    )
    p.add_argument("--out", default=None, help="bundle folder (default: RUN_DIR/bundle)")
    a = p.parse_args(argv)
    from multispin_eval.machine_ref import measure

    try:
        out = export_run(a.run_dir, a.out, a.model)
    except ValueError as e:
        p.exit(2, f"multispin export: error: {e}\n")
    ref = measure()  # right after the latency measurement, on the same machine state
    meta = json.loads((out / "policy.json").read_text())
    lat = meta["decision_latency_us"]
    print(
        f"exported {meta['algo']} policy {Path(meta['source_model']).name} for "
        f"{meta['env_id']} ({meta['action_mode']}, "
        f"K_max={meta['max_users']}) -> {out}"
    )
    print(
        f"parity vs SB3 predict: max |diff| = {meta['parity_max_abs_diff']:.2e} (target 1e-5); "
        f"decision latency on one core: median {lat['median']:.1f} us, p95 {lat['p95']:.1f} us "
        f"(target 50 us)"
    )
    print(ref.describe())
    print(
        "decision latency in ref ops (latency x ref ops/s): "
        f"median {ref.latency_ratio(lat['median'] * 1e-6):.4f}, "
        f"p95 {ref.latency_ratio(lat['p95'] * 1e-6):.4f}"
    )
    return out


if __name__ == "__main__":
    main()
