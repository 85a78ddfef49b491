"""Load and run an exported policy bundle with numpy and onnxruntime only.

A bundle folder (written by ``multispin export``) holds:

- ``policy.onnx``: the deterministic actor, raw observation in, action out, with the training
  run's observation normalisation folded in. Its ONNX metadata (key ``multispin.policy``)
  carries a copy of the contract below, written at export time;
- ``policy.json``: the contract: observation feature names and order, action mode, K_max,
  L_max, the env id and options it was trained on, a hash of the run's config, library
  versions, measured parity and latency, the sha256 of ``policy.onnx`` and an integrity
  hash over ``policy.onnx`` *and* this file.

Everything is checked when the bundle is loaded, so a bad bundle fails at load time with a
message that names the field and says what to do, never at the first decision:

1. ``policy.json`` is a JSON object of format :data:`BUNDLE_FORMAT` with exactly the known
   fields, each of the right type and range (:data:`FIELDS`);
2. the fields agree with each other and with the action codec: ``action_size`` is what the
   action mode gives for K_max users, the feature names are K_max user slots with the same
   features in the same order followed by the global features;
3. ``policy.onnx`` has the sha256 in ``onnx_sha256``; the graph's input and output widths are
   ``observation_size`` and ``action_size``; every field equals the graph's embedded copy;
4. ``integrity_sha256`` is the sha256 of the ONNX bytes followed by the canonical JSON of the
   sidecar without that field, so an edit to either file that the checks above cannot see
   (say, the recorded library versions) still fails.

This module imports only the standard library and numpy at import time, and onnxruntime
when a bundle is loaded: it must run where the simulator (numba, scipy, gymnasium) and the
training stack (torch, SB3) are not installed. Keep it that way (tested in a subprocess that
blocks those modules).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

BUNDLE_FORMAT = 2
METADATA_KEY = "multispin.policy"
HASH_FIELDS = ("onnx_sha256", "integrity_sha256")

# the action codec's modes and their action widths for K_max users; kept in step with
# multispin_env.action_codec (tests/test_hardening_bundle.py compares the two)
ACTION_SIZES = {
    "full": lambda k: 2 * k,
    "lengths": lambda k: k,
    "lengths_discrete": lambda k: k,
    "homogeneous": lambda k: 1,
    "homogeneous_discrete": lambda k: 1,
    "residual": lambda k: k,
}
ALGOS = ("ppo", "a2c", "sac", "td3")
MAX_DRAFT_LENGTH_LIMIT = 1024

_ENV_ID = re.compile(r"^(?:[A-Za-z][\w.-]*/)?[A-Za-z][\w.-]*-v\d+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_USER_FEATURE = re.compile(r"^user(\d+)\.([A-Za-z_][A-Za-z0-9_]*)$")
_GLOBAL_FEATURE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BundleError(ValueError):
    """The bundle cannot be used; the text says why and what to do."""


def canonical_json(obj) -> bytes:
    """The byte form the hashes are taken over (key order and spacing fixed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def contract_of(meta: dict) -> dict:
    """The sidecar without its hash fields: what the graph carries a copy of."""
    return {k: v for k, v in meta.items() if k not in HASH_FIELDS}


def integrity_sha256(onnx_bytes: bytes, meta: dict) -> str:
    """sha256 over the ONNX bytes and the sidecar minus ``integrity_sha256``."""
    rest = {k: v for k, v in meta.items() if k != "integrity_sha256"}
    return hashlib.sha256(onnx_bytes + b"\0" + canonical_json(rest)).hexdigest()


# ---- field checks: each returns an error text (what is wrong and the allowed values) or None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_in(lo, hi):
    def check(v):
        if not _is_int(v) or not lo <= v <= hi:
            return f"must be an integer in [{lo}, {hi}]"
        return None

    return check


def _sha256(v):
    return None if isinstance(v, str) and _SHA256.match(v) else "must be 64 lowercase hex digits"


def _env_id(v):
    if isinstance(v, str) and _ENV_ID.match(v):
        return None
    return "must be a registered Gymnasium id such as 'multispin/PaperLlama2-v0'"


def _env_kwargs(v):
    if not isinstance(v, dict) or not all(isinstance(k, str) and k for k in v):
        return "must be an object of option names to values"

    def scalar(x) -> bool:
        return isinstance(x, (str, bool, type(None))) or _is_number(x)

    # a scenario override may be a flat mapping of scalars (e.g. a verification law)
    bad = [
        k
        for k, x in v.items()
        if not (scalar(x) or (isinstance(x, dict) and all(scalar(y) for y in x.values())))
    ]
    return f"has non-scalar or non-finite values for {bad}" if bad else None


def _one_of(choices):
    def check(v):
        return None if v in choices else f"must be one of {list(choices)}"

    return check


def _str(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _versions(v):
    if isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        return None
    return "must be an object of package names to version strings"


def _feature_names(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        return "must be a non-empty list of strings"
    return None


def _parity(v):
    return None if _is_number(v) and v >= 0 else "must be a finite number >= 0"


def _latency(v):
    if (
        isinstance(v, dict)
        and set(v) == {"median", "p95"}
        and all(_is_number(x) and x > 0 for x in v.values())
    ):
        return None
    return "must be {'median': us, 'p95': us} with positive numbers"


def _levers(v):
    if (
        isinstance(v, dict)
        and set(v) == {"stop", "deadline", "groups"}
        and isinstance(v["stop"], bool)
        and isinstance(v["deadline"], bool)
        and isinstance(v["groups"], int)
        and not isinstance(v["groups"], bool)
        and 1 <= v["groups"] <= 8
    ):
        return None
    return "must be {'stop': bool, 'deadline': bool, 'groups': int in [1, 8]}"


def lever_action_size(levers: dict | None, max_users: int) -> int:
    """Action values an extended protocol's levers add (see multispin_env.action_codec)."""
    if not levers:
        return 0
    return max_users * (int(levers["stop"]) + int(levers["groups"] > 1)) + int(levers["deadline"])


# name -> (required, check)
FIELDS = {
    "format": (True, _one_of((BUNDLE_FORMAT,))),
    "env_id": (True, _env_id),
    "env_kwargs": (True, _env_kwargs),
    "algo": (True, _one_of(ALGOS)),
    "source_model": (True, _str),
    "action_mode": (True, _one_of(tuple(ACTION_SIZES))),
    "max_users": (True, _int_in(1, 4096)),
    "max_draft_length": (True, _int_in(1, MAX_DRAFT_LENGTH_LIMIT)),
    "observation_size": (True, _int_in(1, 10**6)),
    "action_size": (True, _int_in(1, 10**6)),
    "feature_names": (True, _feature_names),
    "config_sha256": (True, _sha256),
    "versions": (True, _versions),
    "parity_max_abs_diff": (False, _parity),
    "decision_latency_us": (False, _latency),
    "protocol_levers": (False, _levers),
    "onnx_sha256": (True, _sha256),
    "integrity_sha256": (True, _sha256),
}


def feature_layout_error(names: list[str], max_users: int) -> str | None:
    """Why ``names`` is not K_max user slots (``user{k}.{feature}``, the same features in the
    same order in every slot) followed by global features, or None if it is."""
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        return f"repeats {dup}"
    slots: dict[int, list[str]] = {}
    globals_started = False
    for i, name in enumerate(names):
        m = _USER_FEATURE.match(name)
        if m:
            if globals_started:
                return f"has user feature {name!r} at position {i}, after the global features"
            slots.setdefault(int(m.group(1)), []).append(m.group(2))
        elif _GLOBAL_FEATURE.match(name):
            globals_started = True
        else:
            return f"has {name!r} at position {i}, neither 'user<k>.<feature>' nor a global name"
    if sorted(slots) != list(range(max_users)):
        return f"has user slots {sorted(slots)}, but max_users={max_users} needs 0..{max_users - 1}"
    order = [_USER_FEATURE.match(n).group(1) for n in names if _USER_FEATURE.match(n)]
    expected = [str(k) for k in range(max_users) for _ in slots[0]]
    if order != expected:
        return "does not list the user slots in order 0, 1, ..., each slot contiguous"
    for k in range(1, max_users):
        if slots[k] != slots[0]:
            return (
                f"slot user{k} has features {slots[k]}, slot user0 has {slots[0]} "
                "(every slot must list the same features in the same order)"
            )
    return None


def validate_sidecar(meta, where: str = "policy.json") -> dict:
    """Check a sidecar on its own (fields, types, ranges, consistency with the codec); returns
    it or raises :class:`BundleError` naming the field."""
    if not isinstance(meta, dict):
        raise BundleError(
            f"{where} must hold a JSON object of bundle fields, not a {type(meta).__name__}; "
            "re-export the run with `multispin export RUN_DIR`"
        )
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{where}: field 'format' = {meta.get('format')!r}, this version reads format "
            f"{BUNDLE_FORMAT}; re-export the run with `multispin export RUN_DIR`"
        )
    unknown = sorted(set(meta) - set(FIELDS))
    if unknown:
        raise BundleError(
            f"{where}: unknown field(s) {unknown}; known fields are {sorted(FIELDS)}. "
            "The file was edited or written by another tool: re-export the run"
        )
    for name, (required, check) in FIELDS.items():
        if name not in meta:
            if required:
                raise BundleError(
                    f"{where}: field {name!r} is missing; re-export the run with "
                    "`multispin export RUN_DIR`"
                )
            continue
        problem = check(meta[name])
        if problem:
            raise BundleError(f"{where}: field {name!r} = {meta[name]!r} {problem}")
    k, mode = meta["max_users"], meta["action_mode"]
    expected = ACTION_SIZES[mode](k) + lever_action_size(meta.get("protocol_levers"), k)
    if meta["action_size"] != expected:
        raise BundleError(
            f"{where}: field 'action_size' = {meta['action_size']} but action_mode {mode!r} "
            f"with max_users={k} and protocol levers {meta.get('protocol_levers')} has "
            f"{expected} action values"
        )
    names = meta["feature_names"]
    if len(names) != meta["observation_size"]:
        raise BundleError(
            f"{where}: field 'feature_names' has {len(names)} names for observation_size="
            f"{meta['observation_size']} observation values"
        )
    problem = feature_layout_error(names, k)
    if problem:
        raise BundleError(f"{where}: field 'feature_names' {problem}")
    return meta


class PolicyBundle:
    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        folder = Path(folder)
        for name in ("policy.onnx", "policy.json"):
            if not (folder / name).is_file():
                raise BundleError(
                    f"{folder} is not a policy bundle: {name} is missing "
                    "(create one with `multispin export RUN_DIR`)"
                )
        try:
            meta = json.loads((folder / "policy.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{folder}/policy.json is not valid JSON: {err}") from err
        where = f"{folder}/policy.json"
        validate_sidecar(meta, where)
        onnx_bytes = (folder / "policy.onnx").read_bytes()
        if hashlib.sha256(onnx_bytes).hexdigest() != meta["onnx_sha256"]:
            raise BundleError(
                f"{folder}/policy.onnx does not match the sha256 in policy.json "
                "(field 'onnx_sha256'): the graph was modified or belongs to another bundle; "
                "re-export the run"
            )
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.shape[-1] != meta["observation_size"]:
            raise BundleError(
                f"{where}: field 'observation_size' = {meta['observation_size']}, but the graph "
                f"takes {inp.shape[-1]} observation values"
            )
        if out.shape[-1] != meta["action_size"]:
            raise BundleError(
                f"{where}: field 'action_size' = {meta['action_size']}, but the graph returns "
                f"{out.shape[-1]} action values"
            )
        embedded = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if embedded is None:
            raise BundleError(
                f"{folder}/policy.onnx carries no '{METADATA_KEY}' metadata (exported by an "
                "older version?); re-export the run with `multispin export RUN_DIR`"
            )
        graph_meta = json.loads(embedded)
        contract = contract_of(meta)
        for name in sorted(set(contract) | set(graph_meta)):
            mine, theirs = contract.get(name), graph_meta.get(name)
            if mine != theirs:
                if isinstance(mine, list) and isinstance(theirs, list):
                    i = next(
                        (i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                        min(len(mine), len(theirs)),
                    )
                    mine = f"[... {mine[i] if i < len(mine) else None!r} at position {i} ...]"
                    theirs = f"{theirs[i] if i < len(theirs) else None!r} there"
                else:
                    mine, theirs = repr(mine), repr(theirs)
                raise BundleError(
                    f"{where}: field {name!r} = {mine}, but the graph was exported with "
                    f"{theirs}; policy.json was edited after export. Restore it or re-export "
                    "the run"
                )
        if integrity_sha256(onnx_bytes, meta) != meta["integrity_sha256"]:
            raise BundleError(
                f"{where}: field 'integrity_sha256' does not match policy.onnx + policy.json: "
                "one of the two files was modified after export; re-export the run"
            )
        self.meta, self.folder = meta, folder
        self._input, self._output = inp.name, out.name

    @property
    def action_mode(self) -> str:
        return self.meta["action_mode"]

    @property
    def max_users(self) -> int:
        return self.meta["max_users"]

    @property
    def max_draft_length(self) -> int:
        return self.meta["max_draft_length"]

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta["feature_names"])

    def check_features(self, names) -> None:
        """Raise if an observation builder's feature names differ from the policy's."""
        names = list(names)
        if names == self.meta["feature_names"]:
            return
        mine = self.meta["feature_names"]
        first = next(
            (i for i, (a, b) in enumerate(zip(names, mine, strict=False)) if a != b),
            min(len(names), len(mine)),
        )
        raise BundleError(
            f"{self.folder}: the observation has {len(names)} features, the policy expects "
            f"{len(mine)}; first difference at position {first}: "
            f"{names[first] if first < len(names) else None!r} vs "
            f"{mine[first] if first < len(mine) else None!r} (field 'feature_names'). Build "
            f"the observation for {self.meta['env_id']} with max_users={self.max_users}"
        )

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions for observations ``(N, size)`` (or one ``(size,)``)."""
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.ndim == 1
        batch = obs[None] if single else obs
        if batch.shape[-1] != self.meta["observation_size"]:
            raise BundleError(
                f"observation has {batch.shape[-1]} values, the policy expects "
                f"{self.meta['observation_size']} ({self.meta['env_id']})"
            )
        action = self.session.run([self._output], {self._input: batch})[0]
        return action[0] if single else action
