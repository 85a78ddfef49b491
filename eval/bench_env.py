"""Environment throughput: scalar env steps/s and batched env env-steps/s, side by side.

    OMP_NUM_THREADS=1 python -m multispin_eval.bench_env [--num-envs 256] [--steps 2000]
    OMP_NUM_THREADS=1 python -m multispin_eval.bench_env --protocols   # extended ids vs sync

Targets (issue: Gymnasium environments), K = 20 on a 2-core VM: scalar >= 10k steps/s,
batched (N = 256) >= 300k env-steps/s. Absolute figures depend on the machine and its load,
so the run also times a fixed reference workload (``multispin_eval.machine_ref``) and prints
throughput per reference op, the figure to compare across machines. The action is a typical
allocation (every user drafts 4 tokens, equal bandwidth), so episodes last their usual ~80
rounds; random actions would include rounds of tens of seconds and reset far more often.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import multispin_env  # noqa: F401  (registers the ids)
from multispin_eval.machine_ref import measure


def _typical_action(codec, num_users: int, batch: int) -> np.ndarray:
    """Every user drafts 4 tokens with an equal share; under an extended protocol, threshold
    0.475, users alternating between groups 0 and 1, the deadline at the last arrival."""
    from multispin_env.action_codec import ActionCodec

    lengths = np.full((batch, num_users), 4)
    shares = np.full((batch, num_users), 1.0 / num_users)
    plain = ActionCodec(codec.mode, codec.max_users, codec.max_draft_length)
    action = plain.encode(lengths, shares)
    lev, k_max = codec.levers, codec.max_users
    extra = []
    if lev.stop:
        extra.append(np.zeros((batch, k_max)))
    if lev.groups > 1:
        extra.append(
            np.broadcast_to(np.where(np.arange(k_max) % 2 == 0, -0.5, 0.5), (batch, k_max))
        )
    if lev.deadline:
        extra.append(np.ones((batch, 1)))
    return np.concatenate([action, *extra], axis=1).astype(np.float32) if extra else action


def bench_protocols(args) -> None:
    """Batched env-steps/s of the synchronous id and its extended-protocol ids, interleaved."""
    from multispin_env.registration import ENV_IDS, PROTOCOLS, synchronous_id

    sync_id = synchronous_id(args.env_id) or args.env_id
    base = sync_id[: -len("-v0")]
    ids = [sync_id] + [f"{base}{p}-v0" for p in PROTOCOLS if f"{base}{p}-v0" in ENV_IDS]
    if len(ids) == 1:
        raise SystemExit(f"{sync_id} has no extended-protocol ids; try multispin/PaperLlama2-v0")
    envs = {}
    for env_id in ids:
        venv = gym.make_vec(
            env_id, num_envs=args.num_envs, vectorization_mode="vector_entry_point",
            action_mode=args.action_mode,
        )  # fmt: skip
        venv.reset(seed=0)
        action = _typical_action(
            venv.unwrapped.episodes.codec, venv.unwrapped.config.num_users, args.num_envs
        )
        envs[env_id] = (venv, action)
    steps = max(args.steps // 10, 50)
    for venv, action in envs.values():  # warm up: compiled kernels, caches
        for _ in range(10):
            venv.step(action)
    rates = {env_id: [] for env_id in ids}
    ref_before = measure()
    for _ in range(args.repeats):
        for env_id, (venv, action) in envs.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                venv.step(action)
            rates[env_id].append(steps * args.num_envs / (time.perf_counter() - t0))
    ref = ref_before.averaged_with(measure())
    sync = max(rates[sync_id])
    print(
        f"batched N={args.num_envs}, action_mode={args.action_mode}, one thread, best (median) "
        f"of {args.repeats} interleaved repeats"
    )
    print(f"{'env id':<40}{'env-steps/s':>22}{'/ sync':>8}{'per ref op':>12}")
    for env_id, r in rates.items():
        print(
            f"{env_id:<40}{f'{max(r):,.0f} ({np.median(r):,.0f})':>22}"
            f"{max(r) / sync:>8.2f}{ref.rate_ratio(max(r)):>12.0f}"
        )
    print(ref.describe())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multispin_eval.bench_env", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--env-id", default="multispin/PaperLlama2-v0")
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--action-mode", default="full")
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed repeats; the best is reported (the VM's noise only slows)",
    )
    parser.add_argument(
        "--protocols",
        action="store_true",
        help="batched throughput of the env id and its extended-protocol ids, side by side",
    )
    args = parser.parse_args(argv)
    if args.protocols:
        bench_protocols(args)
        return

    env = gym.make(args.env_id, action_mode=args.action_mode).unwrapped
    env.reset(seed=0)
    action = _typical_action(env.codec, env.config.num_users, 1)[0]

    def run_scalar() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            if env.step(action)[3]:
                env.reset()
        return args.steps / (time.perf_counter() - t0)

    venv = gym.make_vec(
        args.env_id,
        num_envs=args.num_envs,
        vectorization_mode="vector_entry_point",
        action_mode=args.action_mode,
    )
    venv.reset(seed=0)
    batch_action = _typical_action(
        venv.unwrapped.episodes.codec, venv.unwrapped.config.num_users, args.num_envs
    )
    batch_steps = max(args.steps // 10, 50)

    def run_batched() -> float:
        t0 = time.perf_counter()
        for _ in range(batch_steps):
            venv.step(batch_action)
        return batch_steps * args.num_envs / (time.perf_counter() - t0)

    ref_before = measure()
    scalar, batched = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        scalar.append(run_scalar())
        batched.append(run_batched())
    s_best, b_best = max(scalar), max(batched)
    ref = ref_before.averaged_with(measure())

    k = env.config.num_users
    print(
        f"{args.env_id}, K={k}, action_mode={args.action_mode}, one thread, "
        f"best (median) of {args.repeats} repeats"
    )
    print(f"{'env':<28}{'steps/s':>22}{'target':>10}{'ratio':>8}")
    print(
        f"{'scalar MultiSpinEnv':<28}{f'{s_best:,.0f} ({np.median(scalar):,.0f})':>22}"
        f"{10_000:>10,}{s_best / 10_000:>8.2f}"
    )
    print(
        f"{f'batched N={args.num_envs} (env-steps)':<28}"
        f"{f'{b_best:,.0f} ({np.median(batched):,.0f})':>22}{300_000:>10,}"
        f"{b_best / 300_000:>8.2f}"
    )
    print(f"batched / scalar per env-step: {b_best / s_best:.1f}x")
    print(ref.describe())
    print(
        f"per ref op (steps/s / ref ops/s): scalar {ref.rate_ratio(s_best):.2f} "
        f"(median {ref.rate_ratio(np.median(scalar)):.2f}), batched {ref.rate_ratio(b_best):.0f} "
        f"(median {ref.rate_ratio(np.median(batched)):.0f})"
    )


if __name__ == "__main__":
    main()
