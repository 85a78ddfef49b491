"""The live timeline's clock: measured on this host, or a hardware profile's.

``--timing measured`` (the default) builds the timeline from what this host measures: the
devices' drafting CPU time (times their speed factor) and the server's verification time.
``--timing profile:PRESET`` keeps the real models (they still produce every token and every
acceptance) but takes drafting and verification *time* from a preset's hardware profile, as
the uplink is already emulated: a device's drafting time per token is the preset's
``t_draft_mean_s`` times its speed factor, a batch's verification time is the preset's
verification law, and a drafted token uploads the preset's payload (``kept_vocab``,
``prob_bits``, ``vocab_size``). A laptop then stands for the paper's hardware (an A100
verifier, phone-class drafters), and a gap between the simulator and the live run is the
acceptance model's alone.

The simulator's counterpart of a profile-timed run is the pair's calibrated scenario
(``demo-pair-cpu``: its per-category acceptance) with the profile's timing fields laid over
it (:func:`profile_overrides`).
"""

from __future__ import annotations

import collections

import numpy as np

from multispin_env.config import load_preset, load_preset_document, preset_names

# the preset fields that make up a hardware profile (the rest is channel and acceptance)
TIMING_FIELDS = (
    "t_draft_mean_s",
    "verification",
    "vocab_size",
    "kept_vocab",
    "prob_bits",
    "server_t_draft_s",
)


def parse_timing(text: str) -> str | None:
    """``measured`` -> None; ``profile:PRESET`` -> the preset's name (checked)."""
    if text == "measured":
        return None
    if text.startswith("profile:"):
        name = text[len("profile:") :]
        if name in preset_names():
            return name
        raise ValueError(
            f"--timing {text}: no preset {name!r}; choose measured or profile:NAME with NAME "
            f"one of {preset_names()}"
        )
    raise ValueError(f"--timing {text!r}: choose measured or profile:PRESET")


def profile_overrides(profile: str) -> dict:
    """The profile's timing fields, to lay over the pair's scenario in the simulator."""
    doc = load_preset_document(profile)
    out = {name: doc[name] for name in TIMING_FIELDS if name in doc}
    if isinstance(out.get("verification"), dict):
        out["verification"] = dict(out["verification"])
    return out


def load_profile(profile: str):
    """The profile's :class:`~multispin_env.config.ScenarioConfig`."""
    return load_preset(profile)


def _busy_drafter(model_dir, stop_after_s: float) -> None:
    """A load process: drafts in a loop, as a device does, until the time is up."""
    import time

    import numpy as np
    import torch

    from multispin_env.live.models import load_drafter
    from multispin_env.live.speculative import DecodingConfig, DrafterSession

    torch.set_num_threads(1)
    drafter = load_drafter(model_dir)
    rng = np.random.default_rng(0)
    session = DrafterSession(drafter, DecodingConfig(), rng)
    session.start(list(rng.integers(1, drafter.cfg.vocab_size, 96)))
    end = time.perf_counter() + stop_after_s
    while time.perf_counter() < end:
        session.propose(4)


def calibrate_here(
    model_dir=None,
    load_processes: int = 0,
    reps: int = 7,
    context_tokens: int = 96,
    pair: str = "builtin",
) -> dict:
    """The pair's timing on this machine, now: the drafter's CPU seconds per token and the
    batched verification law fitted on a (K, L) grid, timed exactly as device and server
    time them (``multispin calibrate``'s functions), with ``load_processes`` drafters
    running beside the verifier (the load a pipelined run puts on the host: one group
    drafts while another is verified). ``context_tokens``: the users' context (prompt plus
    text so far) during the timing; attention makes it matter (the built-in verifier takes
    15.4, 19.7 and 23.4 ms for 8 users x 2 tokens at 96, 160 and 240 tokens), so time at the
    mean context of the run to predict. A few seconds. Returns the scenario overrides
    (``t_draft_mean_s``, ``verification``) and what was measured."""
    import multiprocessing as mp
    import platform
    import time

    import torch

    from multispin_env.live.calibrate import (
        fit_verification,
        load_named_pair,
        time_drafter,
        time_verification,
    )

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pair = load_named_pair(pair, model_dir)
    if model_dir is None and hasattr(pair, "drafter_folder"):
        model_dir = str(pair.drafter_folder)  # what the load processes draft with
    drafter = time_drafter(pair.drafter, context=context_tokens, rounds=30)
    context = mp.get_context("spawn")
    procs = [
        context.Process(target=_busy_drafter, args=(model_dir, 120.0), daemon=True)
        for _ in range(load_processes)
    ]
    for p in procs:
        p.start()
    try:
        if procs:
            time.sleep(3.0)  # let the load processes load their model and start drafting
        rows = time_verification(pair.verifier, context=context_tokens, reps=reps)
        by_context = context_dependence(pair.verifier, context_tokens, reps=reps)
    finally:
        for p in procs:
            p.terminate()
            p.join(timeout=5)
    fit = fit_verification(rows)["token_aware"]
    return {
        "overrides": {
            "t_draft_mean_s": drafter["mean_s"],
            "verification": {
                "kind": "token_aware",
                "t_fix_s": fit["t_fix_s"],
                "t_user_s": fit["t_user_s"],
                "t_token_s": fit["t_token_s"],
            },
        },
        "drafter_per_token": drafter,
        "verification_fit": fit,
        "verification_rows": rows,
        "context_dependence": by_context,
        "load_processes": load_processes,
        "context_tokens": context_tokens,
        "host": {"machine": platform.machine(), "processor": platform.processor()},
        "wall_s": time.perf_counter() - t0,
    }


CONTEXT_SHAPE = (8, 2)  # users x draft length of the verifications timed across contexts


def context_dependence(verifier, context_tokens: int, reps: int = 7) -> dict:
    """How verification time grows with the users' context (attention reads the whole KV
    cache): a (8 users, L = 2) verification timed at 1/2 to 3/2 of ``context_tokens``,
    fitted by a robust line. ``per_token`` is its slope relative to the time at
    ``context_tokens``: the law at context C is the law at ``context_tokens`` times
    :func:`context_factor`. Policies that commit fewer tokens per round verify over
    shorter contexts, and a law timed at one context mispredicts them (the built-in
    verifier takes 0.78x at 96 tokens what it takes at 160)."""
    from multispin_env.live.calibrate import time_verification

    users, length = CONTEXT_SHAPE
    fractions = (0.5, 0.75, 1.0, 1.25, 1.5)
    contexts = sorted({max(8, int(round(context_tokens * f))) for f in fractions})
    seconds = [
        time_verification(verifier, (users,), (length,), context=c, reps=reps)[0]["seconds"]
        for c in contexts
    ]
    # Theil-Sen (the median of the pairwise slopes): a host hiccup that outlasts one
    # point's repetitions moves that point, not the line
    slope = float(
        np.median(
            [
                (seconds[j] - seconds[i]) / (contexts[j] - contexts[i])
                for i in range(len(contexts))
                for j in range(i + 1, len(contexts))
            ]
        )
    )
    intercept = float(np.median(np.array(seconds) - slope * np.array(contexts)))
    at_ref = intercept + slope * context_tokens
    return {
        "contexts": contexts,
        "seconds": seconds,
        "shape": list(CONTEXT_SHAPE),
        "context_tokens": context_tokens,
        "per_token": float(slope / at_ref),
    }


def context_factor(dependence: dict | None, context_tokens: float) -> float:
    """Verification time at ``context_tokens`` over the time at the context the law was
    timed at (1 without a measured dependence), kept within [0.25, 4]."""
    if not dependence:
        return 1.0
    change = context_tokens - dependence["context_tokens"]
    return float(np.clip(1.0 + dependence["per_token"] * change, 0.25, 4.0))


def scaled_law(law: dict, factor: float) -> dict:
    """A verification law (``kind`` plus seconds) with every time multiplied by ``factor``."""
    return {key: value if key == "kind" else value * factor for key, value in law.items()}


def law_at_context(law: dict, dependence: dict | None, context_tokens: float) -> dict:
    """A verification law moved to another context."""
    return scaled_law(law, context_factor(dependence, context_tokens))


def scale_verification_law(law: dict, batches: list[dict], dependence: dict | None = None) -> dict:
    """Scale a token-aware verification law measured idle (``law``: ``t_fix_s``,
    ``t_user_s``, ``t_token_s``) to verifications timed in live runs (``batches``:
    ``users``, ``longest``, ``measured_s``, as the live trace records them).

    The idle grid gives the law's *shape* (how the cost grows with users and padded tokens);
    live runs on this host take a factor more or less, which drifts. One scale, the median
    ratio of measured to idle-law time over every batch, scales all three parts (a median:
    a host hiccup moves one batch, not the scale). Scaling the fixed part and the growing
    part apart was tried: warm-ups of 8-user and 4-user batches a minute apart put the split
    at 0.34 / 1.64 in one run and 2.16 / 0.74 in the next, since the host's drift between
    them (1.33x against 1.05x the idle law, then 1.1x against 1.3x) is larger than any
    shape effect, so one pooled scale is what such data support. With ``dependence``
    (:func:`context_dependence`) and a ``context_tokens`` per batch, each batch is compared
    with the idle law at its own context, so the scale is the host's and not the warm-up's
    context. Returns the scaled law (at the idle law's context), the scale and the batch
    sizes it saw."""
    from multispin_env.verification import build_verification

    if not batches:
        raise ValueError("no live verification to fit the law to")
    idle = build_verification(law)
    ratios, sizes = [], collections.Counter()
    for b in batches:
        users = int(b["users"])
        expected = idle.latency_for_batch_s(users, int(b["longest"]))
        if "context_tokens" in b:
            expected *= context_factor(dependence, float(b["context_tokens"]))
        ratios.append(float(b["measured_s"]) / expected)
        sizes[users] += 1
    scale = float(np.median(ratios))
    return {
        "law": scaled_law(law, scale),
        "scale": scale,
        "batches": len(ratios),
        "batch_sizes": {int(k): int(n) for k, n in sorted(sizes.items())},
    }


def planning_verification(choice: str, scenario=None):
    """The verification law the live server plans with under measured timing (its
    schedulers read it as the simulator's server view holds the scenario's law):

    - ``online``: None; the server fits ``a + b K (L + 1)`` to its own batches as it goes
      (:class:`~multispin_env.live.scheduler.OnlineVerificationModel`);
    - ``scenario``: the scenario preset's law, as ``multispin calibrate`` measured it;
    - a path to a JSON file: a law mapping (``{"kind": "token_aware", "t_fix_s": ...}``) or
      a ``timing.json`` written by ``multispin end-to-end`` (its calibrated law).

    With the same law in the simulator and live, a policy decides alike in both, and a gap
    between them is timing and acceptance, not a planner that learned another law."""
    import json
    from pathlib import Path

    from multispin_env.verification import build_verification

    if choice == "online":
        return None
    if choice == "scenario":
        if scenario is None:
            raise ValueError("--verification-law scenario needs the scenario")
        return scenario.verification_model
    path = Path(choice)
    fix = "pass online, scenario or a JSON file holding a law or an end-to-end timing.json"
    if not path.is_file():
        raise ValueError(f"--verification-law {choice}: no such file; {fix}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--verification-law {choice}: not readable JSON ({err}); {fix}") from None
    if isinstance(doc, dict) and isinstance(doc.get("overrides"), dict):
        doc = doc["overrides"].get("verification")
    if not isinstance(doc, dict):
        raise ValueError(f"--verification-law {choice}: holds no law mapping; {fix}")
    bad = [k for k, v in doc.items() if k != "kind" and not isinstance(v, (int, float))]
    if bad or any(isinstance(v, bool) for v in doc.values()):
        raise ValueError(f"--verification-law {choice}: {bad or 'a flag'} must be numbers; {fix}")
    try:
        return build_verification(doc)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--verification-law {choice}: {err}; {fix}") from None
