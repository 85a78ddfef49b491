"""``multispin live``: an edge server and N device processes running Multi-SPIN rounds.

    multispin live --users 8 --scheduler hete --rounds 50 --trace results/live/trace.jsonl

Devices are separate processes (``python -m multispin_env.live.device``) on loopback, each
with its own drafter, a speed factor drawn from U[0.85, 1.15] (the paper's spread) and a mean
channel gain from U(0.2, 0.5). Prompts are the openings of held-out standard-library files.
Prints per-round progress, then a per-user table and the goodput on the timeline (measured
compute + emulated uplink + measured verification) and on the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def default_prompts(pair, count: int, tokens: int = 48) -> list[list[int]]:
    """Openings of held-out stdlib files (every 20th file is the pair's validation split)."""
    from multispin_env.live.train_pair import stdlib_files

    files = stdlib_files()[::20]
    prompts = []
    for f in files:
        ids = pair.encode(f.read_text(encoding="utf-8", errors="replace"))[:tokens]
        if len(ids) == tokens:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts


def spawn_device(
    port: int,
    device_id: str,
    prompt: list[int],
    *,
    speed: float = 1.0,
    gain: float = 0.35,
    model_dir: str | None = None,
    greedy: bool = False,
    temperature: float = 1.0,
    kept_vocab: int = 1024,
    seed: int = 0,
    time_scale: float = 1.0,
    hf_model: str | None = None,
    device: str = "cpu",
) -> subprocess.Popen:
    """Start one device process (``python -m multispin_env.live.device``) on loopback."""
    cmd = [
        sys.executable,
        "-m",
        "multispin_env.live.device",
        "--port",
        str(port),
        "--device-id",
        device_id,
        "--prompt",
        ",".join(map(str, prompt)),
        "--speed-factor",
        f"{speed:.4f}",
        "--mean-gain",
        f"{gain:.4f}",
        "--temperature",
        str(temperature),
        "--kept-vocab",
        str(kept_vocab),
        "--seed",
        str(seed),
        "--time-scale",
        str(time_scale),
    ]
    if model_dir:
        cmd += ["--model", str(model_dir)]
    if hf_model:
        cmd += ["--hf-model", str(hf_model)]
    cmd += ["--device", device]
    if greedy:
        cmd.append("--greedy")
    return subprocess.Popen(
        cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL
    )


async def run_live(args) -> dict:
    import torch
    from tqdm import tqdm

    from multispin_env.live.models import load_pair
    from multispin_env.live.scheduler import make_scheduler
    from multispin_env.live.server import EdgeServer, LiveConfig, write_trace_header

    torch.set_num_threads(1)
    if args.hf_verifier:  # any pair of local Hugging Face causal LMs sharing a tokenizer
        from types import SimpleNamespace

        from multispin_env.live.hf import load_hf_pair

        if not args.hf_drafter:
            raise ValueError("--hf-verifier needs --hf-drafter too")
        _, verifier, tok = load_hf_pair(args.hf_drafter, args.hf_verifier, device=args.device)
        pair = SimpleNamespace(
            verifier=verifier, encode=lambda t: tok(t)["input_ids"], decode=tok.decode
        )
    else:
        pair = load_pair(args.model, device=args.device)
    if args.trace:
        write_trace_header(args.trace)
    scheduler = make_scheduler(args.scheduler)
    max_users, max_draft_length = args.users, args.max_draft_length
    bundle = getattr(scheduler, "bundle", None)
    if bundle is not None:  # the policy fixes the observation's K_max and L_max
        if args.users > bundle.max_users:
            raise ValueError(f"--users {args.users} exceeds the policy's K_max={bundle.max_users}")
        max_users, max_draft_length = bundle.max_users, bundle.max_draft_length
        # observations must be normalised as in training: use the policy's scenario
        from multispin_env.registration import resolve_env_id

        args.scenario = resolve_env_id(bundle.meta["env_id"])[0]
    cfg = LiveConfig(
        max_users=max_users,
        greedy=args.greedy,
        temperature=args.temperature,
        kept_vocab=args.kept_vocab,
        max_draft_length=max_draft_length,
        trace_path=args.trace,
        seed=args.seed,
        scenario=args.scenario,
        round_timeout_s=args.round_timeout_s,
    )
    server = EdgeServer(cfg, pair.verifier, scheduler, pair.verifier.cfg.vocab_size)
    port = await server.start(port=args.port)
    rng = np.random.default_rng(args.seed)
    prompts = default_prompts(pair, args.users)
    procs = []
    for i, prompt in enumerate(prompts):
        procs.append(
            spawn_device(
                port,
                f"dev-{i}",
                prompt,
                speed=rng.uniform(0.85, 1.15),
                gain=rng.uniform(0.2, 0.5),
                model_dir=args.model,
                greedy=args.greedy,
                temperature=args.temperature,
                kept_vocab=args.kept_vocab,
                seed=args.seed + i,
                hf_model=args.hf_drafter,
                device=args.drafter_device,
            )
        )
    try:
        await server.wait_for_users(len(procs), timeout_s=120)
        bar = tqdm(range(args.rounds), desc=f"live rounds ({args.scheduler})", unit="round")
        for _ in bar:
            rec = await server.play_round()
            if rec is None:
                break
            served = [u for u in rec.users if "accepted" in u]
            bar.set_postfix(
                users=len(served),
                tokens=sum(u["committed"] for u in served),
                timeline_ms=f"{1e3 * rec.timeline_s:.0f}",
            )
    finally:
        await server.stop()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    summary = server.summary() | {"scheduler": args.scheduler, "users": len(procs)}
    print(f"\n{'user':<8}{'speed':>6}{'tokens':>8}{'accept':>8}{'mean L':>8}{'drops':>6}")
    for uid, user in sorted(server.users.items()):
        rows = [r for rec in server.records for r in rec.users if r["device_id"] == uid]
        served = [r for r in rows if "accepted" in r]
        drafted = sum(r["draft_length"] for r in served)
        print(
            f"{uid:<8}{user.speed_factor:>6.2f}{len(server.verifier.outputs[uid]):>8}"
            f"{sum(r['accepted'] for r in served) / max(drafted, 1):>8.2f}"
            f"{drafted / max(len(served), 1):>8.2f}{len(rows) - len(served):>6}"
        )
    print(
        f"\ngoodput: {summary['goodput_timeline_tokens_per_s']:.1f} tokens/s on the timeline "
        f"({summary['timeline_s']:.2f} s), {summary['goodput_wall_tokens_per_s']:.1f} on the "
        f"wall clock ({summary['wall_s']:.2f} s); acceptance {summary['accept_frac']:.3f}"
    )
    sample = next(iter(server.verifier.outputs))
    print(f"sample output of {sample}: {pair.decode(server.verifier.outputs[sample][:40])!r}")
    if args.trace:
        print(f"trace: {args.trace}")
    return summary


def live_args(**overrides) -> argparse.Namespace:
    """The CLI's arguments with its defaults, some replaced (for scripts calling run_live)."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ValueError(f"multispin live has no option {key!r}")
        setattr(args, key, value)
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multispin live", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=4)
    p.add_argument(
        "--scheduler",
        default="hete",
        help="fixed, uni_bw, homo, hete, or bundle:FOLDER (an exported policy)",
    )
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--model", default=None, help="pair folder (default: the built-in pair)")
    p.add_argument("--hf-drafter", default=None, help="local Hugging Face drafter folder")
    p.add_argument("--hf-verifier", default=None, help="local Hugging Face verifier folder")
    p.add_argument(
        "--device", default="cpu", help="torch device of the server's verifier: cpu or cuda"
    )
    p.add_argument(
        "--drafter-device",
        default="cpu",
        help="torch device of the device processes' drafters (user equipment: cpu by default)",
    )
    p.add_argument(
        "--scenario",
        default="paper-llama2",
        help="preset for channel constants and the scheduler's priors "
        "(with a bundle scheduler: the policy's training scenario)",
    )
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kept-vocab", type=int, default=1024)
    p.add_argument("--max-draft-length", type=int, default=8)
    p.add_argument("--round-timeout-s", type=float, default=10.0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default="results/live/trace.jsonl")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    summary = asyncio.run(run_live(args))
    if args.trace:
        Path(args.trace).with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
