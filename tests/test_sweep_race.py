"""Sweep workers started at the same moment on a fresh storage (SQLite or journal file) all
start, share one study and each run their trials; a lost creation race is retried."""

import subprocess
import sys
import textwrap

import pytest

optuna = pytest.importorskip("optuna")

from multispin_train.sweep import make_storage, open_study  # noqa: E402

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    from multispin_train.sweep import main

    barrier, count, me = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    (barrier / me).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < count and time.time() < deadline:
        time.sleep(0.001)  # imports done: the workers open the fresh storage together
    main(sys.argv[4:])
    """
)


def _start_workers(storage: str, out, count: int = 2):
    barrier = out / "barrier"
    barrier.mkdir(parents=True)
    args = [
        "--study", "race", "--storage", storage, "--trials", "1", "--timesteps", "64",
        "--n-envs", "2", "--eval-episodes", "1", "--seeds", "0", "--out", str(out),
        "--env-kwargs", "action_mode:lengths", "num_users:3", "horizon_s:2", "--no-progress",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(barrier), str(count), str(i), *args]
            + ["--sampler-seed", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    return [(p, *p.communicate(timeout=300)) for p in procs]


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_start_at_once_on_a_fresh_storage(tmp_path, kind):
    storage = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else f"journal:{tmp_path}/s.journal"
    for proc, _, err in _start_workers(storage, tmp_path / "runs"):
        assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="race", storage=make_storage(storage))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == [0, 1]
    assert all(t.value > 0 for t in done)


def test_a_lost_creation_race_is_retried(tmp_path, monkeypatch):
    """The exact error the second worker used to crash with, raised once, then it works."""
    import sqlalchemy.exc

    import multispin_train.sweep as sweep

    calls = []

    def racing_storage(url):
        calls.append(url)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError(
                "CREATE TABLE studies", {}, Exception("table studies already exists")
            )
        return make_storage(url)

    monkeypatch.setattr(sweep, "make_storage", racing_storage)
    study = open_study("s", f"sqlite:///{tmp_path}/r.db", backoff_s=0.01, direction="maximize")
    assert len(calls) == 2 and study.study_name == "s"
    monkeypatch.setattr(sweep, "make_storage", make_storage)
    # and a second worker finds the existing study instead of failing
    again = open_study("s", f"sqlite:///{tmp_path}/r.db", backoff_s=0.01)
    assert again._study_id == study._study_id


def test_bad_storage_is_a_clear_error(capsys):
    from multispin_train.sweep import main

    with pytest.raises(SystemExit):
        main(["--study", "x", "--storage", "runs/s.db"])
    assert "journal:PATH" in capsys.readouterr().err
