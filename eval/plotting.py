"""Figures without touching the process's matplotlib backend.

``matplotlib.use("Agg")`` (or ``pyplot``) in a library function changes the backend for the
whole process: a user who runs ``multispin_eval`` from a notebook or a GUI session would lose
their interactive backend. The evaluation code therefore builds :class:`matplotlib.figure.Figure`
objects on their own Agg canvas, which pyplot never sees.
"""

from __future__ import annotations


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """(figure, axes) like ``plt.subplots``, drawn on a private Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout"))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)
