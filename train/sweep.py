"""Hyperparameter sweeps (seeds x scenarios x hyperparameters) on Optuna.

    # one machine, any number of workers (Optuna's journal file; start the command N times):
    multispin sweep --study ppo-lengths --trials 20 --timesteps 100000 \\
        --storage journal:runs/sweeps.journal \\
        --envs multispin/PaperLlama2-v0 multispin/RealisticLlama2-v0 --seeds 0 1 \\
        --env-kwargs action_mode:lengths
    # several machines: start the same command on each, pointing at one database
    multispin sweep --study ppo-lengths --storage postgresql://user:pw@dbhost/optuna ...

Optuna coordinates the workers through the storage (each trial is claimed by one worker;
TPE proposes from all finished trials), so nothing here schedules processes. Workers may
start at the same moment on a fresh storage: creating the storage's tables and the study is
serialised by a lock file for local storages (journal file, SQLite) and retried when another
worker wins the race (any storage, e.g. PostgreSQL on several machines). Optuna recommends
the journal file over SQLite for several processes on one machine (SQLite locks the whole
database on every write). A trial trains
one model per (env, seed), scores each by its goodput relative to Hete-Multi-SPIN on
held-out seeds, and reports the mean; after each (env, seed) it reports the running mean so
the median pruner can stop hopeless trials early.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from pathlib import Path

import numpy as np


def sample_hyperparams(trial) -> tuple[dict, dict]:
    """(PPO hyperparameter overrides, env option overrides) for one trial."""
    n_steps = trial.suggest_categorical("n_steps", [32, 64, 128, 256])
    params = {
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "gamma": trial.suggest_categorical("gamma", [0.5, 0.8, 0.9, 0.95, 0.99]),
        "n_steps": n_steps,
        "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
        "n_epochs": trial.suggest_int("n_epochs", 3, 15),
        "ent_coef": trial.suggest_float("ent_coef", 1e-6, 1e-2, log=True),
        "policy_kwargs": {
            "hidden": trial.suggest_categorical("hidden", [32, 64, 128]),
            "log_std_init": trial.suggest_float("log_std_init", -2.5, -0.5),
            "action_bias": trial.suggest_float("action_bias", -0.8, 0.0),
        },
    }
    env = {"history_decay": trial.suggest_float("history_decay", 0.5, 0.95)}
    return params, env


def make_storage(url: str):
    """An Optuna storage for ``journal:PATH`` (a journal file) or an RDB URL."""
    import optuna

    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
        if not path.name:
            raise ValueError(f"--storage {url!r}: give a file, e.g. journal:runs/sweeps.journal")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # Optuna >= 4.0
            from optuna.storages.journal import JournalFileBackend
        except ImportError:  # Optuna 3.x
            from optuna.storages import JournalFileStorage as JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ValueError(
            f"--storage {url!r} is neither journal:PATH nor a database URL "
            "(sqlite:///file.db, postgresql://user:pw@host/db)"
        )
    kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        # wait for a concurrent writer instead of failing with "database is locked"
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(url, **kwargs)


def _local_file(url: str) -> Path | None:
    if url.startswith("journal:"):
        return Path(url[len("journal:") :])
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    return None


@contextlib.contextmanager
def _creation_lock(url: str):
    """Serialise storage and study creation between workers on this machine (a lock file
    next to a local storage); a no-op for server databases and where fcntl is missing."""
    path = _local_file(url)
    try:
        import fcntl
    except ImportError:  # Windows: the retry in open_study still covers the race
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # not "<path>.lock": the journal file backend uses that name for its own lock
    with open(f"{path}.create-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _creation_races() -> tuple[type[BaseException], ...]:
    """Errors a worker gets when another one creates the same tables or study meanwhile."""
    import optuna

    errors: list[type[BaseException]] = [
        optuna.exceptions.DuplicatedStudyError,
        optuna.exceptions.StorageInternalError,
    ]
    try:
        import sqlalchemy.exc

        errors += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError]
    except ImportError:
        pass
    return tuple(errors)


def open_study(
    study_name: str,
    storage: str,
    attempts: int = 8,
    backoff_s: float = 0.5,
    **study_kwargs,
):
    """Create the study, or load it if another worker did; safe when workers start at the
    same moment on a fresh storage (see the module docstring)."""
    import optuna

    races = _creation_races()
    for attempt in range(1, attempts + 1):
        try:
            with _creation_lock(storage):
                return optuna.create_study(
                    study_name=study_name,
                    storage=make_storage(storage),
                    load_if_exists=True,
                    **study_kwargs,
                )
        except races as err:
            if attempt == attempts:
                raise RuntimeError(
                    f"could not create or load study {study_name!r} in {storage} after "
                    f"{attempts} attempts ({type(err).__name__}: {err}); check that the "
                    "storage is reachable and writable"
                ) from err
            time.sleep(backoff_s * attempt * (0.5 + random.random()))
    raise AssertionError("unreachable")


def run_study(
    study_name: str,
    storage: str,
    envs: list[str],
    seeds: list[int],
    trials: int,
    timesteps: int,
    env_kwargs: dict,
    out_dir: str,
    eval_episodes: int = 8,
    sampler_seed: int | None = None,
    n_envs: int | None = None,
    progress: bool = True,
):
    import optuna

    from multispin_eval.compare import EVAL_SEED_START, compare
    from multispin_train.train import TrainConfig, train

    def objective(trial) -> float:
        params, env_overrides = sample_hyperparams(trial)
        scores = []
        for i, (env_id, seed) in enumerate((e, s) for e in envs for s in seeds):
            run_dir = (
                Path(out_dir)
                / study_name
                / f"trial{trial.number}"
                / (f"{env_id.split('/')[-1]}_s{seed}")
            )
            cfg = TrainConfig(
                env_id=env_id,
                seed=seed,
                timesteps=timesteps,
                n_envs=n_envs,
                env_kwargs={**env_kwargs, **env_overrides},
                hyperparams=params,
                run_dir=str(run_dir),
                eval_freq=0,
                checkpoint_freq=0,
                progress_bar=False,
                name=f"trial{trial.number}",
            )
            train(cfg)
            eval_seeds = list(range(EVAL_SEED_START, EVAL_SEED_START + eval_episodes))
            rows = compare(
                env_id,
                ["hete", f"learned={run_dir}"],
                eval_seeds,
                env_kwargs=cfg.env_kwargs,
                progress=False,
            )
            scores.append(next(r["vs_hete"] for r in rows if r["policy"] == "learned"))
            trial.report(float(np.mean(scores)), i)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(scores))

    study = open_study(
        study_name,
        storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
    )
    study.set_user_attr("envs", envs)
    study.set_user_attr("seeds", seeds)
    study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    return study


def main(argv=None):
    from multispin_train.hyperparams import parse_cli_kwargs

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(prog="multispin sweep", description=__doc__.split("\n")[0])
    p.add_argument("--study", required=True, help="study name (shared by all workers)")
    p.add_argument(
        "--storage",
        default="journal:runs/sweeps.journal",
        help="journal:PATH (Optuna journal file: several workers on one machine), or a "
        "database URL: postgresql://user:pw@host/db shared by several machines, "
        "sqlite:///file.db",
    )
    p.add_argument("--envs", nargs="+", default=["multispin/PaperLlama2-v0"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--trials", type=int, default=10, help="trials run by this worker")
    p.add_argument("--timesteps", type=int, default=100_000)
    p.add_argument("--eval-episodes", type=int, default=8)
    p.add_argument("--env-kwargs", nargs="*", default=["action_mode:lengths"])
    p.add_argument("--out", default="runs/sweeps")
    p.add_argument("--sampler-seed", type=int)
    p.add_argument("--n-envs", type=int, help="training envs per run (default: hyperparams)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    if not a.storage.startswith("journal:") and "://" not in a.storage:
        p.error(
            f"--storage {a.storage!r}: use journal:PATH (one machine) or a database URL "
            "(postgresql://user:pw@host/db for several machines, sqlite:///file.db)"
        )
    study = run_study(
        a.study,
        a.storage,
        a.envs,
        a.seeds,
        a.trials,
        a.timesteps,
        parse_cli_kwargs(a.env_kwargs),
        a.out,
        a.eval_episodes,
        a.sampler_seed,
        a.n_envs,
        a.progress,
    )
    done = [t for t in study.trials if t.value is not None]
    if done:
        print(f"best trial {study.best_trial.number}: goodput / Hete = {study.best_value:.3f}")
        print(f"params: {study.best_params}")
    return study


if __name__ == "__main__":
    main()
