"""Read rl-baselines3-zoo style hyperparameter files into SB3 constructor arguments.

Supported zoo conventions: ``lin_<x>`` linear schedules, ``policy_kwargs`` as a
``"dict(...)"`` string (evaluated with only ``dict`` and ``torch.nn`` in scope), ``normalize``
as a bool or a ``"{...}"`` string of VecNormalize arguments, ``n_envs``, ``n_timesteps``,
``policy`` (an SB3 alias or a dotted class path), and TD3/SAC ``noise_type``/``noise_std``.
"""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

ALGOS = ("ppo", "a2c", "sac", "td3")
_ZOO_KEYS = ("n_envs", "n_timesteps", "policy", "normalize", "noise_type", "noise_std")


def linear_schedule(initial: float):
    def schedule(progress_remaining: float) -> float:
        return progress_remaining * initial

    schedule.initial = initial  # for logging and the saved config
    return schedule


def load_hyperparams(
    algo: str, env_id: str, path: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Raw hyperparameters for (algo, env id) from a zoo-format YAML file."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r}; choose one of {ALGOS}")
    if path is None:
        text = (resources.files("multispin_train") / "hyperparams" / f"{algo}.yml").read_text()
        source = f"multispin_train/hyperparams/{algo}.yml"
    else:
        if not Path(path).is_file():
            raise ValueError(f"hyperparams file {path!r} does not exist")
        text, source = Path(path).read_text(), path
    table = yaml.safe_load(text) or {}
    if env_id not in table:
        known = sorted(k for k in table if k != "default")
        raise ValueError(f"{source} has no entry for {env_id!r}; it has {known}")
    params = dict(table[env_id])
    params.update(overrides or {})
    return params


def split_hyperparams(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(zoo-level settings, keyword arguments for the SB3 algorithm constructor)."""
    zoo = {k: params[k] for k in _ZOO_KEYS if k in params}
    algo_kwargs = {k: v for k, v in params.items() if k not in _ZOO_KEYS}
    for key in ("learning_rate", "clip_range"):
        value = algo_kwargs.get(key)
        if isinstance(value, str):
            if not value.startswith("lin_"):
                raise ValueError(f"{key}={value!r}: only numbers and 'lin_<x>' are supported")
            algo_kwargs[key] = linear_schedule(float(value[4:]))
    if isinstance(algo_kwargs.get("policy_kwargs"), str):
        algo_kwargs["policy_kwargs"] = parse_policy_kwargs(algo_kwargs["policy_kwargs"])
    policy = zoo.get("policy", "MlpPolicy")
    if isinstance(policy, str) and "." in policy:  # a class path, e.g. our per-user policy
        import importlib

        module, _, name = policy.rpartition(".")
        try:
            zoo["policy"] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"policy {policy!r} cannot be imported: {err}") from err
    normalize = zoo.get("normalize", False)
    if isinstance(normalize, str):
        normalize = ast.literal_eval(normalize)
    zoo["normalize"] = normalize
    return zoo, algo_kwargs


def parse_policy_kwargs(text: str) -> dict[str, Any]:
    """Evaluate a zoo ``policy_kwargs`` string with only ``dict`` and ``nn`` available."""
    from torch import nn

    tree = ast.parse(text, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in ("dict", "nn"):
            raise ValueError(f"policy_kwargs may only use dict(...) and nn.*; found {node.id!r}")
        if isinstance(node, ast.Attribute) and not (
            isinstance(node.value, ast.Name) and node.value.id == "nn"
        ):
            raise ValueError("policy_kwargs attributes must be of the form nn.<Name>")
    value = eval(
        compile(tree, "<policy_kwargs>", "eval"),
        {"__builtins__": {}},  # noqa: S307
        {"dict": dict, "nn": nn},
    )
    if not isinstance(value, dict):
        raise ValueError("policy_kwargs must evaluate to a dict")
    return value


_WORDS = {
    "true": True,
    "false": False,
    "none": None,
    "null": None,
    "nan": float("nan"),
    "inf": float("inf"),
    "+inf": float("inf"),
    "-inf": float("-inf"),
}


def parse_cli_value(raw: str) -> Any:
    """One ``value`` of ``key:value``: a Python literal (``8``, ``1e-3``, ``'x'``,
    ``{'tokens': 1.0}``); ``true``/``false`` (any case) as booleans, ``none``/``null`` as None,
    ``nan``/``inf``/``-inf`` as floats (which validation then rejects by name); anything else
    is kept as a string (``action_mode:lengths``)."""
    text = raw.strip()
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def parse_cli_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``key:value`` pairs (zoo's --env-kwargs / --hyperparams syntax); values as in
    :func:`parse_cli_value`, so ``observe_true_alpha:false`` is ``False``, not the (truthy)
    string ``'false'``."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"expected key:value, got {item!r}")
        out[key.strip()] = parse_cli_value(raw)
    return out
