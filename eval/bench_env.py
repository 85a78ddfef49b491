"""Environment throughput: scalar env steps/s and batched env env-steps/s, side by side.

    OMP_NUM_THREADS=1 python -m multispin_eval.bench_env [--num-envs 256] [--steps 2000]

Targets (issue: Gymnasium environments), K = 20 on this 2-core machine: scalar >= 10k
steps/s, batched (N = 256) >= 300k env-steps/s. The action is a typical allocation (every
user drafts 4 tokens, equal bandwidth), so episodes last their usual ~80 rounds; random
actions would include rounds of tens of seconds and reset far more often.
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np

import multispin_env  # noqa: F401  (registers the ids)


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
    args = parser.parse_args(argv)

    env = gym.make(args.env_id, action_mode=args.action_mode).unwrapped
    env.reset(seed=0)
    action = _typical_action(env.codec, env.config.num_users, 1)[0]
    resets = 0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _, _, _, truncated, _ = env.step(action)
        if truncated:
            env.reset()
            resets += 1
    scalar = args.steps / (time.perf_counter() - t0)

    venv = gym.make_vec(args.env_id, num_envs=args.num_envs,
                        vectorization_mode="vector_entry_point", action_mode=args.action_mode)
    venv.reset(seed=0)
    batch_action = _typical_action(venv.unwrapped.episodes.codec, venv.unwrapped.config.num_users,
                                   args.num_envs)
    batch_steps = max(args.steps // 10, 50)
    t0 = time.perf_counter()
    for _ in range(batch_steps):
        venv.step(batch_action)
    batched = batch_steps * args.num_envs / (time.perf_counter() - t0)

    k = env.config.num_users
    print(f"{args.env_id}, K={k}, action_mode={args.action_mode}, one thread")
    print(f"{'env':<28}{'steps/s':>14}{'target':>10}{'ratio':>8}")
    print(f"{'scalar MultiSpinEnv':<28}{scalar:>14,.0f}{10_000:>10,}{scalar / 10_000:>8.2f}")
    print(f"{f'batched N={args.num_envs} (env-steps)':<28}{batched:>14,.0f}{300_000:>10,}"
          f"{batched / 300_000:>8.2f}")
    print(f"batched / scalar per env-step: {batched / scalar:.1f}x "
          f"(scalar episodes completed: {resets})")


if __name__ == "__main__":
    main()
