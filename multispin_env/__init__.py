"""multispin_env: the Multi-SPIN system model (RL-agnostic core) and its Gymnasium layer.

Core modules (no gymnasium import, enforced by tests/test_env.py): ``_jit``,
``allocation``, ``config``, ``observation``, ``physics``, ``rng``, ``simulator``, ``types``,
``verification``. Env layer: ``action_codec``, ``episodes``, ``env``, ``vector_env``,
``registration``, ``render``. Importing the package registers the ``multispin/...`` ids.
"""

from multispin_env.config import ScenarioConfig, TaskSpec, load_preset, preset_names
from multispin_env.simulator import MultiSpinSimulator
from multispin_env.types import Allocation, RoundResult

try:  # the env layer needs gymnasium; the core above does not
    from multispin_env.registration import ENV_IDS, register_envs

    register_envs()
except ImportError:  # pragma: no cover - gymnasium is a declared dependency
    ENV_IDS = {}

__all__ = [
    "ENV_IDS",
    "Allocation",
    "MultiSpinSimulator",
    "RoundResult",
    "ScenarioConfig",
    "TaskSpec",
    "load_preset",
    "preset_names",
]
