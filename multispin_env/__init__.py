"""multispin_env: the Multi-SPIN system model (RL-agnostic core) and its Gymnasium layer.

Core modules (no gymnasium import): ``config``, ``physics``, ``verification``, ``rng``,
``simulator``, ``types``.
"""

from multispin_env.config import ScenarioConfig, TaskSpec, load_preset, preset_names
from multispin_env.simulator import MultiSpinSimulator
from multispin_env.types import Allocation, RoundResult

__all__ = [
    "Allocation",
    "MultiSpinSimulator",
    "RoundResult",
    "ScenarioConfig",
    "TaskSpec",
    "load_preset",
    "preset_names",
]
