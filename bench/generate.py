"""Generation speed of the engine: a token decoded against the KV cache against the same token got
by recomputing the whole prefix (the baseline, in the same run), one prompt and a batch.

    python bench/generate.py [MODEL.gguf] [--tokens 32] [--batch 40] [--repeat 3]

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantcli.engine.generate import GenerateOptions, Generator  # noqa: E402
from quantcli.engine.model import Model, forward  # noqa: E402
from quantcli.engine.tokenizer import Tokenizer  # noqa: E402
from quantcli.formats import open_model  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "List three colors:"]


def main() -> None:
    ap = argparse.ArgumentParser()
    default = Path(os.environ.get("QUANTCLI_MODEL_CACHE", ".")) / "gemma3-270m-f32.gguf"
    ap.add_argument("model", nargs="?", type=Path, default=default)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with open_model(a.model) as r:
        model, tok = Model(r), Tokenizer.from_model(r)
        gen = Generator(model)
        opts = GenerateOptions(max_tokens=a.tokens, stop=frozenset())
        prompt = tok.encode(PROMPTS[0])
        single = []
        for _ in range(a.repeat):
            out = gen.generate(prompt, opts)
            single.append(out.tokens_per_second)
        # the baseline: each of the same tokens by a forward pass over the whole prefix, no cache
        seq, recompute = list(prompt), []
        for t in out.tokens[:8]:
            t0 = time.perf_counter()
            forward(model, np.array(seq))
            recompute.append(time.perf_counter() - t0)
            seq.append(t)
        batch_rates = []
        prompts = [tok.encode(p) for p in PROMPTS] * (a.batch // len(PROMPTS))
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            outs = gen.generate_batch(prompts, opts)
            batch_rates.append(sum(len(o.tokens) for o in outs) / (time.perf_counter() - t0))
    cached = 1 / statistics.median(single)
    print(f"{a.model.name}: one prompt, {a.tokens} tokens: {statistics.median(single):.1f} tokens/s "
          f"({1000 * cached:.0f} ms per token)")
    print(f"recomputing the prefix instead: {1000 * statistics.median(recompute):.0f} ms per token "
          f"({statistics.median(recompute) / cached:.1f}x the cached token's time, prefixes of "
          f"{len(prompt)}-{len(prompt) + 7} tokens)")
    print(f"{len(prompts)} prompts at once, {a.tokens} tokens each, prefill included: "
          f"{statistics.median(batch_rates):.1f} tokens/s")


if __name__ == "__main__":
    main()
