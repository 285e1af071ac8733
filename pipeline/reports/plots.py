"""The reports' plots: one size and palette, matplotlib figures drawn off screen (no
display, no pyplot state) and embedded in a page as base64 PNG, so that a report is one
file with no external resource.
"""

from __future__ import annotations

import base64
import io

from matplotlib.axes import Axes
from matplotlib.figure import Figure

FIG_SIZE = (5.0, 4.0)
FIG_DPI = 90

CHALLENGER_COLOUR = "#1f77b4"
CHAMPION_COLOUR = "#ff7f0e"
REFERENCE_COLOUR = "#888888"


def legend_label(label: str) -> str:
    """A legend label matplotlib shows verbatim (no mathtext, not hidden by a leading '_')."""
    return label.replace("$", r"\$")


def new_axes() -> tuple[Figure, Axes]:
    """A figure of the reports' size with one set of axes."""
    fig = Figure(figsize=FIG_SIZE, dpi=FIG_DPI)
    ax = fig.add_subplot(1, 1, 1)
    return fig, ax


def no_data(ax: Axes, message: str) -> None:
    """Say on ``ax`` why it draws nothing."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#b3261e")


def png_base64(fig: Figure) -> str:
    """``fig`` as a PNG, base64-encoded for a ``data:`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIG_DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
