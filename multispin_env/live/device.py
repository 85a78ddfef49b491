"""A device: a drafter model behind a TCP connection to the edge server.

    python -m multispin_env.live.device --port 7400 --device-id dev0 --prompt 12,55,901 \\
        --speed-factor 1.3 --model multispin_env/live/models/demo-pair

Per round it drafts ``draft_length`` tokens with its own KV cache, then waits out its emulated
uplink (payload bits / (B_k r_k), the paper's Eq. 9) before sending the draft. Compute time
is measured as this process's CPU time (so it does not grow when devices share the host's
cores) times the device's speed factor; slower devices (factor > 1) also sleep the extra
time so that wall-clock behaves like the timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from multispin_env.live import protocol as proto


@dataclass
class DeviceConfig:
    """One device.

    Attributes:
        device_id: stable name; reconnecting with the same id resumes the same user.
        prompt: prompt token ids (used on first join; on rejoin the server's record wins).
        speed_factor: compute slowdown vs this host (device heterogeneity, T^S_k).
        mean_gain: average channel gain H_bar_k reported to the server.
        model_dir: folder of the pair (its ``drafter/`` is loaded).
        greedy, temperature, kept_vocab: decoding settings (must match the server's).
        seed: seeds this device's draft sampling.
        time_scale: multiplies emulated sleeps (tests use < 1 to run faster).
    """

    device_id: str
    prompt: list[int]
    host: str = "127.0.0.1"
    port: int = 7400
    speed_factor: float = 1.0
    mean_gain: float = 0.35
    model_dir: str | None = None
    greedy: bool = False
    temperature: float = 1.0
    kept_vocab: int = 1024
    seed: int = 0
    time_scale: float = 1.0
    prob_bits: int = 16
    hf_model: str | None = None  # a local Hugging Face model folder instead of model_dir
    device: str = "cpu"
    log: list = field(default_factory=list)


async def run_device(cfg: DeviceConfig, drafter=None) -> list[int]:
    """Serve rounds until the server says bye or closes; returns the committed tokens."""
    import torch

    from multispin_env.live.models import load_drafter
    from multispin_env.live.speculative import DecodingConfig, DrafterSession

    torch.set_num_threads(1)
    if drafter is None and cfg.hf_model:
        from multispin_env.live.hf import load_hf_model

        drafter = load_hf_model(cfg.hf_model, device=cfg.device)
    elif drafter is None:
        drafter = load_drafter(cfg.model_dir, device=cfg.device)
    decoding = DecodingConfig(
        greedy=cfg.greedy, temperature=cfg.temperature, kept_vocab=cfg.kept_vocab
    )
    session = DrafterSession(drafter, decoding, np.random.default_rng(cfg.seed))
    reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
    await proto.send_message(
        writer,
        proto.message(
            "hello",
            device_id=cfg.device_id,
            prompt=cfg.prompt,
            speed_factor=cfg.speed_factor,
            mean_gain=cfg.mean_gain,
        ),
    )
    welcome = await proto.read_message(reader)
    if welcome["type"] != "welcome":
        raise proto.ProtocolError(f"expected welcome, got {welcome['type']}")
    committed = list(welcome["committed"])
    session.start(cfg.prompt + committed)
    last_round = None
    vocab = drafter.cfg.vocab_size
    try:
        while True:
            msg = await proto.read_message(reader)
            kind = msg["type"]
            if kind == "round":
                t0 = time.thread_time()
                draft = session.propose(msg["draft_length"])
                compute_s = (time.thread_time() - t0) * cfg.speed_factor
                rate_bps = msg["bandwidth_hz"] * msg["spectral_eff"]
                upload_s = draft.payload_bits(vocab, cfg.prob_bits) / max(rate_bps, 1e-9)
                extra = compute_s * (1 - 1 / cfg.speed_factor) if cfg.speed_factor > 1 else 0.0
                await asyncio.sleep((extra + upload_s) * cfg.time_scale)
                last_round = msg["round"]
                await proto.send_message(
                    writer,
                    proto.message(
                        "draft",
                        round=msg["round"],
                        tokens=draft.tokens,
                        q_indices=draft.q_indices.tobytes(),
                        q_values=draft.q_values.tobytes(),
                        kept=int(draft.q_indices.shape[1]),
                        compute_s=compute_s,
                        upload_s=upload_s,
                    ),
                )
            elif kind == "result":
                if msg["round"] != last_round:
                    cfg.log.append(f"ignored result for round {msg['round']}")
                    continue
                session.commit(msg["accepted"], msg["committed"])
                committed.extend(msg["committed"])
            elif kind == "error":
                cfg.log.append(f"server error {msg['code']}: {msg['message']}")
            elif kind == "bye":
                break
    except asyncio.IncompleteReadError:
        pass  # server closed the connection
    finally:
        writer.close()
    return committed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7400)
    p.add_argument("--device-id", required=True)
    p.add_argument("--prompt", required=True, help="comma-separated token ids")
    p.add_argument("--speed-factor", type=float, default=1.0)
    p.add_argument("--mean-gain", type=float, default=0.35)
    p.add_argument("--model", default=None, help="model pair folder (default: built-in pair)")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kept-vocab", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--hf-model", default=None, help="local Hugging Face drafter folder")
    p.add_argument("--device", default="cpu", help="torch device for the drafter")
    a = p.parse_args(argv)
    cfg = DeviceConfig(
        device_id=a.device_id,
        prompt=[int(t) for t in a.prompt.split(",")],
        host=a.host,
        port=a.port,
        speed_factor=a.speed_factor,
        mean_gain=a.mean_gain,
        model_dir=a.model,
        greedy=a.greedy,
        temperature=a.temperature,
        kept_vocab=a.kept_vocab,
        seed=a.seed,
        time_scale=a.time_scale,
        hf_model=a.hf_model,
        device=a.device,
    )
    asyncio.run(run_device(cfg))


if __name__ == "__main__":
    main()
