"""Policies: the Multi-SPIN paper's solvers and (later) learned policies.

Installed as ``multispin_agents`` (folder ``agents/``); see README "Layout".

The solver names below are imported lazily (PEP 562 module ``__getattr__``): importing
``multispin_agents.bundle`` must not pull in the simulator (numba, scipy, gymnasium), because
a deployed policy bundle needs only numpy and onnxruntime.
"""

from __future__ import annotations

import importlib

__all__ = [
    "SOLVERS",
    "brute_force_oracle",
    "cen_spin",
    "fixed_bw_and_length",
    "hete_multispin",
    "homo_multispin",
    "homo_optimal_length",
    "latency_equalising_bandwidth",
    "p2p_spin",
    "uni_bw_multispin",
]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module("multispin_agents.solvers"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'multispin_agents' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
