"""The llama.cpp tools the optional tests run: $QUANTCLI_LLAMA_BIN first, then PATH (the benches'
lookup, `bench._util.llama_bin`)."""

from __future__ import annotations

from pathlib import Path

from bench._util import llama_bin


def llama_tool(name: str) -> Path | None:
    """The path of llama.cpp's `name` (llama-perplexity, llama-quantize, ...), or None."""
    return llama_bin(name)
