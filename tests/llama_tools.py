"""The llama.cpp tools the optional tests run: $QUANTCLI_LLAMA_BIN first, then PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def llama_tool(name: str) -> Path | None:
    """The path of llama.cpp's `name` (llama-perplexity, llama-quantize, ...), or None."""
    d = os.environ.get("QUANTCLI_LLAMA_BIN")
    if d and (Path(d) / name).is_file():
        return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None
