"""Load and run an exported policy bundle with numpy and onnxruntime only.

A bundle folder (written by ``multispin export``) holds:

- ``policy.onnx``: the deterministic actor, raw observation in, action out, with the training
  run's observation normalisation folded in;
- ``policy.json``: the contract: observation feature names and order, action mode, K_max,
  L_max, the env id and options it was trained on, a hash of the run's config, library
  versions, and the sha256 of ``policy.onnx``.

Everything is checked when the bundle is loaded (files present, format version, checksum,
graph input/output shapes against the sidecar), so a bad bundle fails at load time with a
message that says what is wrong, never at the first decision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

BUNDLE_FORMAT = 1


class BundleError(ValueError):
    """The bundle cannot be used; the text says why and what to do."""


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
        except json.JSONDecodeError as err:
            raise BundleError(f"{folder}/policy.json is not valid JSON: {err}") from err
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(
                f"{folder}: bundle format {meta.get('format')!r}, this version "
                f"reads format {BUNDLE_FORMAT}; re-export the run"
            )
        onnx_bytes = (folder / "policy.onnx").read_bytes()
        digest = hashlib.sha256(onnx_bytes).hexdigest()
        if digest != meta.get("onnx_sha256"):
            raise BundleError(
                f"{folder}/policy.onnx does not match the sha256 in policy.json: "
                "the graph was modified or belongs to another bundle"
            )
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.shape[-1] != meta["observation_size"]:
            raise BundleError(
                f"{folder}: the graph takes {inp.shape[-1]} observation values but "
                f"policy.json says {meta['observation_size']}"
            )
        if out.shape[-1] != meta["action_size"]:
            raise BundleError(
                f"{folder}: the graph returns {out.shape[-1]} action values but "
                f"policy.json says {meta['action_size']}"
            )
        if len(meta["feature_names"]) != meta["observation_size"]:
            raise BundleError(
                f"{folder}: {len(meta['feature_names'])} feature names for "
                f"{meta['observation_size']} observation values"
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
