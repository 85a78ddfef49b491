"""Environment throughput: scalar env steps/s and batched env env-steps/s, side by side.

    OMP_NUM_THREADS=1 python -m multispin_eval.bench_env [--num-envs 256] [--steps 2000]

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
    lengths = np.full((batch, num_users), 4)
    shares = np.full((batch, num_users), 1.0 / num_users)
    action = codec.encode(lengths, shares)
    return action


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    args = parser.parse_args(argv)

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
