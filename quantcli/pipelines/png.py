"""PNG figures for people (`smooth --plot`, `report --plot`): matplotlib, the `plot` extra."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from quantcli.errors import OutputError


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Render `fig` (then close it) and write the PNG atomically: a temporary file beside `path`,
    fsynced, renamed."""
    import matplotlib.pyplot as plt

    from quantcli.formats.atomic import atomic_write

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    try:
        with atomic_write(Path(path)) as fh:
            fh.write(buf.getvalue())
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the plot: {exc.strerror}") from None
