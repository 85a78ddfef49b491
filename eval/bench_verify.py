"""Batched-verification latency on any torch device (the GPU timing of the live verifier).

    python -m multispin_eval.bench_verify --device cuda --models demo-pair llama2-7b \
        --users 1 2 4 8 16 --lengths 1 2 4 8 --out results/gpu_verify

For every model and (users K, draft length L) it times two things:

- ``server``: one ``VerifierServer.verify`` step, exactly as the live edge server runs it
  (re-padding the per-user KV caches into one batch, the batched forward, the acceptance rule
  on the uploaded truncated PMFs, cache bookkeeping), sampling mode, K users with a 96-token
  context each;
- ``forward``: the bare padded batched forward of K x (L + 1) new tokens over a shared
  96-token KV cache, synchronised (the model's own cost, without our Python bookkeeping).

Both are fitted to the paper's affine model ``T_fix + K T_lin`` (Eq. 7) and to the
token-aware model ``T_fix + c_K K + c_tok K (L + 1)``, with R^2 and worst relative error,
and printed next to the paper's A100 fit for Llama-2-7B (22.68 + 12.72 K ms, Fig. 5).

Models: ``demo-pair`` is the committed verifier (6 x 256 GPT); ``llama2-7b`` and
``llama2-1b`` are Llama architectures with *random* weights (latency does not depend on the
weights' values, and nothing can be downloaded); ``tiny-llama`` is a 2-layer Llama for tests.
This file imports only ``multispin_env`` so it also runs as ``python eval/bench_verify.py``
from a bare checkout (PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

PAPER_A100_LLAMA2_MS = (22.68, 12.72)  # paper Fig. 5: T_fix, T_lin for Llama-2-7B on an A100

LLAMA_SHAPES = {
    # hidden, layers, heads, kv heads, intermediate, vocab
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000),
    "llama2-1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B's shape
    "tiny-llama": (64, 2, 4, 2, 128, 512),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model(name: str, device: str, dtype: torch.dtype):
    """(verifier with ``forward_cached``, the raw transformers model or None)."""
    if name == "demo-pair":
        from multispin_env.live.models import load_pair

        return load_pair(device=device).verifier, None
    if name not in LLAMA_SHAPES:
        raise ValueError(
            f"--models: unknown model {name!r}; choose demo-pair or {list(LLAMA_SHAPES)}"
        )
    from transformers import LlamaConfig, LlamaForCausalLM

    from multispin_env.live.hf import HFCausalLM

    hidden, layers, heads, kv_heads, inter, vocab = LLAMA_SHAPES[name]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return HFCausalLM(model), model


def _prefilled(model, device: str, users: int, length: int, context: int):
    """(cache keyword, new tokens ``(users, length + 1)``, per-layer (keys, values) of a
    ``context``-token prefill): the inputs of one timed verification forward."""
    import inspect

    from transformers import DynamicCache

    # transformers renamed past_key_values to cache (as in multispin_env.live.hf)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(users * 100 + length)
    prompt = torch.randint(1, vocab, (users, context), generator=gen).to(device)
    new = torch.randint(1, vocab, (users, length + 1), generator=gen).to(device)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **{key: DynamicCache()})
    full = getattr(out, "cache", None) or out.past_key_values
    return key, new, [(layer.keys, layer.values) for layer in full.layers]


def time_forward(model, device: str, users: int, length: int, context: int, reps: int) -> float:
    """Median seconds of the bare padded forward of ``users x (length + 1)`` tokens."""
    from transformers import DynamicCache

    key, new, layers = _prefilled(model, device, users, length, context)
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            cache = DynamicCache(ddp_cache_data=layers)  # appending makes new tensors
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=new, use_cache=True, **{key: cache})
            _sync(device)
            if i >= 2:  # two warm-ups
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def time_forward_graph(
    model, device: str, users: int, length: int, context: int, reps: int
) -> float | None:
    """The same forward captured once in a CUDA graph and replayed: the GPU's own cost
    without per-kernel launch overhead (what serving stacks get from CUDA graphs). None
    where capture is not possible (CPU, or a model that syncs with the host)."""
    if not device.startswith("cuda"):
        return None
    from transformers import DynamicCache

    key, new, layers = _prefilled(model, device, users, length, context)
    with torch.no_grad():

        def step():
            return model(
                input_ids=new, use_cache=True, **{key: DynamicCache(ddp_cache_data=layers)}
            )

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                step()
        except Exception as err:  # noqa: BLE001 - report, do not abort the benchmark
            print(f"CUDA graph capture failed ({type(err).__name__}: {err})")
            return None
        times = []
        for i in range(reps + 2):
            _sync(device)
            t0 = time.perf_counter()
            graph.replay()
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def run(args) -> dict:
    from multispin_env.live.calibrate import fit_verification, time_verification

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    report = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "context_tokens": args.context,
        "paper_a100_llama2_ms": PAPER_A100_LLAMA2_MS,
        "models": {},
    }
    for name in args.models:
        t0 = time.perf_counter()
        verifier, raw = build_model(
            name, args.device, dtype if name != "demo-pair" else torch.float32
        )
        entry = {"build_s": time.perf_counter() - t0}
        if not args.skip_server:
            rows = time_verification(
                verifier,
                users=args.users,
                lengths=args.lengths,
                context=args.context,
                reps=args.reps,
            )
            entry["server"] = {"rows": rows, "fit": fit_verification(rows)}
        if raw is not None:
            frows = [
                {
                    "users": k,
                    "draft_length": length,
                    "seconds": time_forward(raw, args.device, k, length, args.context, args.reps),
                }
                for k in args.users
                for length in args.lengths
            ]
            entry["forward"] = {"rows": frows, "fit": fit_verification(frows)}
            grows = []
            for k in args.users:
                for length in args.lengths:
                    s = time_forward_graph(raw, args.device, k, length, args.context, args.reps)
                    if s is None:
                        break
                    grows.append({"users": k, "draft_length": length, "seconds": s})
            if len(grows) == len(frows):
                entry["forward_cuda_graph"] = {"rows": grows, "fit": fit_verification(grows)}
        report["models"][name] = entry
        del verifier, raw
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print_model(name, entry)
    return report


def print_model(name: str, entry: dict) -> None:
    for kind in ("server", "forward", "forward_cuda_graph"):
        if kind not in entry:
            continue
        rows, fit = entry[kind]["rows"], entry[kind]["fit"]
        lengths = sorted({r["draft_length"] for r in rows})
        users = sorted({r["users"] for r in rows})
        ms = {(r["users"], r["draft_length"]): 1e3 * r["seconds"] for r in rows}
        print(f"\n{name} · {kind} (ms, median)")
        print(f"{'K':>4}" + "".join(f"{'L=' + str(length):>9}" for length in lengths))
        for k in users:
            print(f"{k:>4}" + "".join(f"{ms[(k, length)]:>9.2f}" for length in lengths))
        a, t = fit["affine"], fit["token_aware"]
        print(
            f"affine      T = {1e3 * a['t_fix_s']:.2f} + {1e3 * a['t_lin_s']:.2f} K ms"
            f"  (R^2 {a['r2']:.3f}, worst {100 * a['worst_rel_error']:.0f}%)"
        )
        print(
            f"token-aware T = {1e3 * t['t_fix_s']:.2f} + {1e3 * t['t_user_s']:.3f} K"
            f" + {1e3 * t['t_token_s']:.4f} K(L+1) ms"
            f"  (R^2 {t['r2']:.3f}, worst {100 * t['worst_rel_error']:.0f}%)"
        )
    fix, lin = PAPER_A100_LLAMA2_MS
    print(f"paper, Llama-2-7B on an A100: T = {fix} + {lin} K ms")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["demo-pair", "llama2-7b"])
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--context", type=int, default=96, help="prompt tokens per user")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--out", default=None, help="folder for verify_latency.json")
    p.add_argument("--skip-server", action="store_true", help="time only the bare forward")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch on this machine")
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    report = run(args)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "verify_latency.json").write_text(json.dumps(report, indent=1))
        print(f"\nwrote {out / 'verify_latency.json'}")
    return report


if __name__ == "__main__":
    main()
