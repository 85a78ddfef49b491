"""Registered Gymnasium ids: one per preset and dynamics setting (namespace ``multispin``).

    gymnasium.make("multispin/PaperLlama2-v0", num_users=10, action_mode="lengths")
    gymnasium.make_vec("multispin/PaperLlama2-v0", num_envs=256,
                       vectorization_mode="vector_entry_point")

``...Dynamic-v0`` variants switch on per-request acceptance (hidden, Beta around Table I),
request churn (geometric requests of 256 tokens on average) and CSI error (std 0.3) on top
of the paper preset. ``RealisticLlama2-v0`` adds token-aware verification cost and energy.
``DemoPairCPU-v0`` is the profile ``multispin calibrate`` measured from the built-in live pair.

Extended protocols (``multispin_env.protocols``): ``PaperLlama2EarlyStop-v0``,
``PaperLlama2Deadline-v0``, ``PaperLlama2Pipeline-v0`` (two groups, proactive drafting) and the
same three over ``RealisticLlama2``.

``gym.make_vec(id, n)`` builds the native batched env (``vector_entry_point``, SAME_STEP
autoreset). ``vectorization_mode="sync"``/``"async"`` use Gymnasium's NEXT_STEP autoreset
unless ``vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}`` is passed; see
:class:`multispin_env.vector_env.MultiSpinVectorEnv`.
"""

from __future__ import annotations

import gymnasium as gym

DYNAMIC = {"per_request_acceptance": True, "request_length_tokens": 256.0, "csi_error_std": 0.3}

ENV_IDS: dict[str, tuple[str, dict]] = {
    "multispin/PaperLlama2-v0": ("paper-llama2", {}),
    "multispin/PaperQwen35-v0": ("paper-qwen35", {}),
    "multispin/PaperLlama2Dynamic-v0": ("paper-llama2", DYNAMIC),
    "multispin/PaperQwen35Dynamic-v0": ("paper-qwen35", DYNAMIC),
    "multispin/RealisticLlama2-v0": ("realistic-llama2", {}),
    # calibrated from the built-in live pair on this CPU (multispin calibrate)
    # rounds take ~25 ms there, so a 3 s horizon keeps episodes at ~120 rounds
    "multispin/DemoPairCPU-v0": ("demo-pair-cpu", {"horizon_s": 3.0}),
    # SmolLM2-135M-Instruct and its distilled drafter on this CPU (multispin calibrate --pair
    # smollm2): rounds take ~0.2-0.4 s, so ~120 rounds in 30 s
    "multispin/SmolLM2CPU-v0": ("smollm2-cpu", {"horizon_s": 30.0}),
}
# the extended protocols (multispin_env.protocols) over the paper and realistic scenarios
PROTOCOLS = {
    "EarlyStop": {"early_stop": True},
    "Deadline": {"streaming_deadline": True},
    "Pipeline": {"pipeline_groups": 2},
}
for _name, (_preset, _base) in (
    ("PaperLlama2", ("paper-llama2", {})),
    ("RealisticLlama2", ("realistic-llama2", {})),
):
    for _protocol, _switches in PROTOCOLS.items():
        ENV_IDS[f"multispin/{_name}{_protocol}-v0"] = (_preset, {**_base, **_switches})


def synchronous_id(env_id: str) -> str | None:
    """The synchronous id an extended-protocol id builds on (``...Pipeline-v0`` ->
    ``...-v0``); None for an id that is not an extended protocol's."""
    for protocol in PROTOCOLS:
        suffix = f"{protocol}-v0"
        if env_id.endswith(suffix) and env_id in ENV_IDS:
            return env_id[: -len(suffix)] + "-v0"
    return None


def resolve_env_id(name: str) -> tuple[str, dict]:
    """(preset, default kwargs) for a registered id; a bare preset name maps to itself."""
    if name in ENV_IDS:
        preset, kwargs = ENV_IDS[name]
        return preset, dict(kwargs)
    if "/" in name:
        raise ValueError(f"unknown env id {name!r}; registered ids: {sorted(ENV_IDS)}")
    return name, {}


def register_envs() -> None:
    for env_id, (preset, overrides) in ENV_IDS.items():
        if env_id in gym.registry:
            continue
        gym.register(
            id=env_id,
            entry_point="multispin_env.env:MultiSpinEnv",
            vector_entry_point="multispin_env.vector_env:make_vector_env",
            kwargs={"scenario": preset, **overrides},
            disable_env_checker=False,
        )
