"""Policies: the Multi-SPIN paper's solvers and (later) learned policies.

Installed as ``multispin_agents`` (folder ``agents/``); see README "Layout".
"""

from multispin_agents.solvers import (
    SOLVERS,
    brute_force_oracle,
    cen_spin,
    fixed_bw_and_length,
    hete_multispin,
    homo_multispin,
    homo_optimal_length,
    latency_equalising_bandwidth,
    p2p_spin,
    uni_bw_multispin,
)

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
