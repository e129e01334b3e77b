"""Matplotlib figures -> PNG bytes (headless), for reports and curves written atomically."""

from __future__ import annotations

import io
from typing import Any


def figure_png(fig: Any, **savefig_kwargs: Any) -> bytes:
    """Render ``fig`` to PNG bytes and close it (figures left open leak memory in long runs)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    return buf.getvalue()
