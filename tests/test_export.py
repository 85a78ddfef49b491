"""Policy export: ONNX parity with SB3, bad bundles fail at load, deployment as a live scheduler."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS

from multispin_agents.bundle import BundleError, PolicyBundle
from multispin_train.export import export_run
from multispin_train.train import main as train_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {
        # per-user policy, raw observations
        "peruser": ["--env-kwargs", "action_mode:lengths", "num_users:5", "max_users:6"],
        # MLP with VecNormalize on observations (folded into the graph)
        "mlp": [
            "--env-kwargs",
            "action_mode:full",
            "num_users:4",
            "--hyperparams-file",
            "train/hyperparams/ppo_mlp.yml",
        ],
        "discrete": ["--env-kwargs", "action_mode:lengths_discrete", "num_users:4"],
        # corrections to a base heuristic, which the live scheduler must rebuild
        "residual": ["--env-kwargs", "action_mode:residual", "base_policy:homo", "num_users:4"],
    }.items():
        train_main(TINY_TRAIN_ARGS + ["--run-dir", str(root / name)] + extra)
        made[name] = root / name
    return made


@pytest.mark.parametrize("name", ["peruser", "mlp", "discrete", "residual"])
def test_export_matches_sb3_policy(runs, name):
    out = export_run(runs[name], parity_samples=64)
    meta = json.loads((out / "policy.json").read_text())
    assert meta["parity_max_abs_diff"] <= 1e-5
    assert meta["decision_latency_us"]["median"] > 0
    bundle = PolicyBundle(out)
    assert len(meta["feature_names"]) == meta["observation_size"]
    if name == "mlp":  # the normalisation is inside the graph: raw observations go in
        from multispin_eval.harness import LearnedController

        learned = LearnedController(runs[name])
        assert learned.obs_norm is not None and learned.obs_norm.norm_obs
    obs = np.zeros(meta["observation_size"], dtype=np.float32)
    assert bundle.act(obs).shape == (meta["action_size"],)


def test_bad_bundles_fail_at_load(runs, tmp_path):
    good = export_run(runs["peruser"], tmp_path / "good", parity_samples=16)
    with pytest.raises(BundleError, match="policy.onnx is missing"):
        PolicyBundle(tmp_path / "nothing-here")
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    data = bytearray((tampered / "policy.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "policy.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        PolicyBundle(tampered)
    for field, value, message in (
        ("format", 99, "format"),
        ("observation_size", 7, "observation values"),
    ):
        bad = tmp_path / f"bad-{field}"
        shutil.copytree(good, bad)
        meta = json.loads((bad / "policy.json").read_text())
        meta[field] = value
        (bad / "policy.json").write_text(json.dumps(meta))
        with pytest.raises(BundleError, match=message):
            PolicyBundle(bad)
    bundle = PolicyBundle(good)
    with pytest.raises(BundleError, match="expects"):
        bundle.act(np.zeros(5, dtype=np.float32))


@pytest.mark.parametrize("name", ["peruser", "residual"])
def test_bundle_deployed_as_live_scheduler(runs, tmp_path, tiny_pair_factory, name):
    """The live server builds the env observation (with a residual policy: including its base
    heuristic's allocation), the bundle decides, the env codec decodes."""
    import asyncio

    from multispin_env.live.device import DeviceConfig, run_device
    from multispin_env.live.scheduler import make_scheduler
    from multispin_env.live.server import EdgeServer, LiveConfig

    bundle_dir = export_run(runs[name], tmp_path / "b", parity_samples=16)
    scheduler = make_scheduler(f"bundle:{bundle_dir}")
    drafter, verifier = tiny_pair_factory(48)

    async def scenario():
        cfg = LiveConfig(
            max_users=scheduler.bundle.max_users,
            greedy=True,
            kept_vocab=16,
            max_draft_length=scheduler.bundle.max_draft_length,
        )
        server = EdgeServer(cfg, verifier, scheduler, 48)
        port = await server.start()
        tasks = [
            asyncio.create_task(
                run_device(
                    DeviceConfig(d, [1, 2], port=port, greedy=True, kept_vocab=16, time_scale=0.0),
                    drafter=drafter,
                )
            )
            for d in ("u0", "u1", "u2")
        ]
        await server.wait_for_users(3)
        records = [await server.play_round() for _ in range(3)]
        await server.stop()
        await asyncio.gather(*tasks)
        return records

    records = asyncio.run(scenario())
    for rec in records:
        lengths = [u["draft_length"] for u in rec.users]
        assert len(lengths) == 3 and all(1 <= x <= 25 for x in lengths)
        assert sum(u["bandwidth_hz"] for u in rec.users) == pytest.approx(10e6)
    with pytest.raises(ValueError, match="bundle:FOLDER"):
        make_scheduler("greedy-magic")


def test_evaluate_takes_an_exported_bundle_and_matches_its_run(runs, tmp_path):
    """A committed bundle is evaluated like its training run: same goodput on the same seeds
    (the ONNX graph is the SB3 actor to 1e-5), and a bundle from another scenario is refused."""
    from multispin_eval.compare import compare

    bundle = export_run(runs["residual"], tmp_path / "b", parity_samples=16)
    rows = compare(
        "multispin/PaperLlama2-v0",
        [f"bundle={bundle}", f"run={runs['residual'] / 'model.zip'}", "homo"],
        list(range(5)),
        env_kwargs={"num_users": 4},
        progress=False,
    )
    by = {r["policy"]: r for r in rows}
    assert by["bundle"]["goodput"] == pytest.approx(by["run"]["goodput"], rel=1e-6)
    with pytest.raises(ValueError, match="trained on"):
        compare("multispin/RealisticLlama2-v0", [str(bundle)], [0], progress=False)
