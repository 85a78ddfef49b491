"""Policy bundles: the loader needs only numpy + onnxruntime, and every field of policy.json is
checked against the graph, the codec and an integrity hash over both files."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from multispin_agents.bundle import (
    ACTION_SIZES,
    BUNDLE_FORMAT,
    BundleError,
    PolicyBundle,
    integrity_sha256,
)
from multispin_env.observation import ObservationSpec
from multispin_train.export import write_bundle

K, L_MAX = 3, 25


def _graph(obs_size: int, act_size: int, seed: int = 0) -> bytes:
    """A small ONNX actor (observation -> tanh(obs @ W)) built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((obs_size, act_size)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["observation", "W"], ["z"]),
            helper.make_node("Tanh", ["z"], ["action"]),
        ],
        "actor",
        [helper.make_tensor_value_info("observation", TensorProto.FLOAT, ["batch", obs_size])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", act_size])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _meta(mode: str = "lengths") -> dict:
    spec = ObservationSpec(K, L_MAX, 0.03, 31744.0, 10e6)
    return {
        "format": BUNDLE_FORMAT,
        "env_id": "multispin/PaperLlama2-v0",
        "env_kwargs": {"action_mode": mode, "num_users": K, "max_users": K},
        "algo": "ppo",
        "source_model": "runs/x/model.zip",
        "action_mode": mode,
        "max_users": K,
        "max_draft_length": L_MAX,
        "observation_size": spec.size,
        "action_size": ACTION_SIZES[mode](K),
        "feature_names": spec.feature_names,
        "config_sha256": "ab" * 32,
        "versions": {"onnx": "1", "onnxruntime": "1"},
        "parity_max_abs_diff": 1e-7,
        "decision_latency_us": {"median": 30.0, "p95": 40.0},
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    meta = _meta()
    out = tmp_path_factory.mktemp("bundle") / "good"
    write_bundle(out, _graph(meta["observation_size"], meta["action_size"]), meta)
    return out


def _tampered(good, tmp_path, edit, rehash: bool):
    """Copy of the bundle with ``edit(meta)`` applied to policy.json; with ``rehash`` the
    integrity hash is recomputed as a careless hand edit or a tool might do."""
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    meta = json.loads((bad / "policy.json").read_text())
    meta = edit(meta)
    if rehash and isinstance(meta, dict):
        meta["integrity_sha256"] = integrity_sha256((bad / "policy.onnx").read_bytes(), meta)
    (bad / "policy.json").write_text(json.dumps(meta))
    return bad


def _set(field, value):
    def edit(meta):
        meta[field] = value
        return meta

    return edit


def _drop(field):
    def edit(meta):
        del meta[field]
        return meta

    return edit


def _rename_feature(meta):
    meta["feature_names"][4] = "user0.upload_time"
    return meta


def _swap_features(meta):
    names = meta["feature_names"]
    names[1], names[2] = names[2], names[1]
    return meta


def _swap_in_every_slot(meta):  # consistent across slots: only the graph's copy can tell
    per_user = (meta["observation_size"] - 3) // K
    names = meta["feature_names"]
    for k in range(K):
        i = k * per_user
        names[i + 1], names[i + 2] = names[i + 2], names[i + 1]
    return meta


# (case id, edit, text the error must contain: the field's name)
TAMPERS = [
    ("renamed-feature", _rename_feature, "feature_names"),
    ("swapped-features", _swap_features, "feature_names"),
    ("swapped-in-every-slot", _swap_in_every_slot, "feature_names"),
    ("bogus-action-mode", _set("action_mode", "bogus"), "action_mode"),
    ("other-action-mode", _set("action_mode", "lengths_discrete"), "action_mode"),
    ("changed-max-draft-length", _set("max_draft_length", 20), "max_draft_length"),
    ("zero-max-draft-length", _set("max_draft_length", 0), "max_draft_length"),
    ("garbage-env-id", _set("env_id", "not an env!"), "env_id"),
    ("other-env-id", _set("env_id", "multispin/PaperQwen35-v0"), "env_id"),
    ("garbage-config-hash", _set("config_sha256", "xyz"), "config_sha256"),
    ("other-config-hash", _set("config_sha256", "cd" * 32), "config_sha256"),
    ("max-users-as-string", _set("max_users", "3"), "max_users"),
    ("changed-max-users", _set("max_users", 4), "max_users"),
    ("changed-action-size", _set("action_size", 6), "action_size"),
    ("changed-env-kwargs", _set("env_kwargs", {"action_mode": "full"}), "env_kwargs"),
    ("unknown-algo", _set("algo", "dqn"), "algo"),
    ("changed-versions", _set("versions", {"onnx": "9"}), "versions"),
    ("negative-parity", _set("parity_max_abs_diff", -1.0), "parity_max_abs_diff"),
    ("missing-key", _drop("feature_names"), "feature_names"),
    ("missing-format", _drop("format"), "format"),
    ("old-format", _set("format", 1), "format"),
    ("unknown-field", _set("bonus", 1), "bonus"),
    ("bad-onnx-hash", _set("onnx_sha256", "00" * 32), "onnx_sha256"),
    ("json-list", lambda meta: [meta], "JSON object"),
]


@pytest.mark.parametrize("rehash", [False, True], ids=["stale-hash", "rehashed"])
@pytest.mark.parametrize("edit,field", [t[1:] for t in TAMPERS], ids=[t[0] for t in TAMPERS])
def test_tampered_sidecar_is_rejected_naming_the_field(good, tmp_path, edit, field, rehash):
    bad = _tampered(good, tmp_path, edit, rehash)
    with pytest.raises(BundleError, match=field):
        PolicyBundle(bad)


def test_good_bundle_loads_and_reformatting_the_sidecar_is_harmless(good, tmp_path):
    bundle = PolicyBundle(good)
    assert bundle.max_draft_length == L_MAX and bundle.action_mode == "lengths"
    assert bundle.act(np.zeros(bundle.meta["observation_size"])).shape == (K,)
    # the integrity hash is over the content, not the formatting
    same = _tampered(good, tmp_path, lambda m: dict(reversed(list(m.items()))), rehash=False)
    PolicyBundle(same)


def test_integrity_hash_covers_graph_and_sidecar(good, tmp_path):
    import hashlib

    # a different graph with a matching onnx_sha256: only the integrity hash can tell
    bad = tmp_path / "regraphed"
    shutil.copytree(good, bad)
    meta = json.loads((bad / "policy.json").read_text())
    other = tmp_path / "other"
    write_bundle(other, _graph(meta["observation_size"], meta["action_size"], seed=1), _meta())
    onnx_bytes = (other / "policy.onnx").read_bytes()
    (bad / "policy.onnx").write_bytes(onnx_bytes)
    meta["onnx_sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    (bad / "policy.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="integrity_sha256"):
        PolicyBundle(bad)
    # a wrong integrity hash alone
    bad2 = _tampered(good, tmp_path / "x", _set("integrity_sha256", "11" * 32), rehash=False)
    with pytest.raises(BundleError, match="integrity_sha256.*modified"):
        PolicyBundle(bad2)


def test_loader_codec_table_matches_the_env_codec():
    from multispin_env.action_codec import MODES, ActionCodec

    assert set(ACTION_SIZES) == set(MODES)
    for mode in MODES:
        for k in (1, 4, 7):
            space = ActionCodec(mode, k, 9).space
            assert ACTION_SIZES[mode](k) == int(np.prod(space.shape) or 1), mode


def test_check_features_names_the_first_difference(good):
    bundle = PolicyBundle(good)
    bundle.check_features(ObservationSpec(K, L_MAX, 0.03, 31744.0, 10e6).feature_names)
    with pytest.raises(BundleError, match="feature_names"):
        bundle.check_features(ObservationSpec(K, L_MAX, 0.03, 31744.0, 10e6, True).feature_names)


BLOCKED = ("scipy", "numba", "gymnasium", "multispin_env", "torch", "stable_baselines3")


def test_loader_imports_only_numpy_and_onnxruntime(good):
    """A deployment without the simulator or training stack loads and runs a bundle."""
    script = textwrap.dedent(
        f"""
        import sys

        BLOCKED = {BLOCKED!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        from multispin_agents.bundle import PolicyBundle

        bundle = PolicyBundle({str(good)!r})
        print(bundle.act([0.0] * bundle.meta["observation_size"]).shape)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        import multispin_agents
        try:
            multispin_agents.hete_multispin  # the solvers need the simulator: blocked here
        except ImportError:
            print("solvers blocked")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"({K},)", "solvers", "blocked"]


def test_solvers_still_import_from_the_package():
    import multispin_agents

    assert callable(multispin_agents.hete_multispin)
    assert "hete" in multispin_agents.SOLVERS or len(multispin_agents.SOLVERS) > 0
    with pytest.raises(AttributeError):
        multispin_agents.no_such_thing  # noqa: B018
