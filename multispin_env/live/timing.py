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
