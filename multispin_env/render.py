"""Human-facing views of a round (never on the training path: only ``env.render()``)."""

from __future__ import annotations

import numpy as np


def ansi_table(episodes, i: int) -> str:
    """Per-user table of the last round of env ``i`` in its current episode."""
    sim, res = episodes.sim, episodes.last_result
    lines = [
        f"{episodes.config.name}  t = {episodes.elapsed_s[i]:.3f} s  "
        f"rounds = {episodes.episode_rounds[i]}"
    ]
    if res is None or episodes.episode_rounds[i] == 0:  # just reset: no round this episode
        return lines[0] + "  (no round played yet)\n"
    share = episodes.last_bandwidth[i] / episodes.config.bandwidth_hz
    lines.append(
        f"{'user':>4} {'r^ b/s/Hz':>9} {'T^S ms':>7} {'L':>3} {'share':>6} "
        f"{'acc':>4} {'draft ms':>8} {'upload ms':>9}"
    )
    for k in range(sim.num_users):
        mark = "*" if k == res.straggler[i] else " "
        lines.append(
            f"{k:>4}{mark}{sim.spectral_eff_estimate[i, k]:>9.2f} "
            f"{1e3 * sim.t_draft_s[i, k]:>7.1f} {episodes.last_lengths[i, k]:>3d} "
            f"{share[k]:>6.3f} {res.accepted[i, k]:>4d} {1e3 * res.t_draft_s[i, k]:>8.1f} "
            f"{1e3 * res.t_upload_s[i, k]:>9.1f}"
        )
    lines.append(
        f"round {1e3 * res.round_time_s[i]:.1f} ms (verify {1e3 * res.t_verify_s[i]:.1f} ms), "
        f"{res.committed[i].sum()} tokens, {res.goodput_tokens_per_s[i]:.1f} tokens/s; "
        f"* = straggler"
    )
    return "\n".join(lines) + "\n"


def rgb_array(episodes, i: int) -> np.ndarray:
    """Bar charts of draft length, bandwidth share and accepted tokens per user."""
    # a private Agg canvas: the user's pyplot backend (a notebook, a GUI) stays as it is
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    res = episodes.last_result
    k = episodes.sim.num_users
    users = np.arange(k)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    lengths = episodes.last_lengths[i]
    share = episodes.last_bandwidth[i] / episodes.config.bandwidth_hz
    played = res is not None and episodes.episode_rounds[i] > 0  # not the last episode's
    accepted = res.accepted[i] if played else np.zeros(k)
    for ax, values, label in zip(
        axes,
        (lengths, share, accepted),
        ("draft length", "bandwidth share", "accepted"),
        strict=True,
    ):
        ax.bar(users, values, color="tab:blue")
        ax.set_ylabel(label)
    axes[-1].set_xlabel("user")
    axes[0].set_title(f"{episodes.config.name}, t = {episodes.elapsed_s[i]:.2f} s")
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    return image
