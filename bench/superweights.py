"""Super weights: what detection costs `imatrix`, and what protection buys at low bits, judged by
llama.cpp itself.

    QUANTCLI_LLAMA_BIN=/path/to/llama.cpp/bin python bench/superweights.py [MODEL.gguf]
        [--calib genesis.txt] [--calib-chunks 64] [--text exodus.txt] [--chunks 16]
        [--presets IQ2_XXS,IQ2_XS,IQ1_M,Q2_K] [--types Q4_K,Q3_K] [--repeats 1] [--work DIR]

1. `quantcli imatrix MODEL --text CALIB --chunks N` without and with `--super-weights` (the same
   chunks; --repeats times each, medians): the detection's cost, and an imatrix that records the
   super weights (the two hold the same statistics).
2. For each preset: `quantize --type PRESET --imatrix I` and, for each --types T,
   `quantize --type PRESET --imatrix I --protect-super-weights --super-weight-type T`; the file sizes
   and `llama-perplexity` on --text (held out: not the calibration text).

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import llama_bin  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"


def run(*args: str) -> dict:
    cmd = [sys.executable, "-m", "quantcli", *args, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr}")
    return json.loads(res.stdout)


def perplexity(model: Path, text: Path, chunks: int, threads: int) -> float:
    exe = llama_bin("llama-perplexity")
    res = subprocess.run([str(exe), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks),
                          "-t", str(threads)], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    if res.returncode or m is None:
        raise SystemExit(f"llama-perplexity failed on {model}:\n{res.stderr[-2000:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("QUANTCLI_MODEL_CACHE", "."))
    ap.add_argument("model", nargs="?", type=Path, default=cache / "gemma3-270m-f32.gguf")
    ap.add_argument("--calib", type=Path, default=SHARED / "text" / "genesis.txt")
    ap.add_argument("--calib-chunks", type=int, default=64)
    ap.add_argument("--text", type=Path, default=SHARED / "text" / "exodus.txt")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--presets", default="IQ2_XXS,IQ2_XS,IQ1_M,Q2_K")
    ap.add_argument("--types", default="Q4_K,Q3_K")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/quantcli-bench-superweights"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    im = a.work / "imatrix-sw.gguf"

    times: dict[str, list[float]] = {"plain": [], "super_weights": []}
    for _ in range(a.repeats):
        for kind, extra in (("plain", []), ("super_weights", ["--super-weights"])):
            out = im if extra else a.work / "imatrix.gguf"
            t0 = time.perf_counter()
            doc = run("imatrix", str(a.model), "--text", str(a.calib), "--chunks", str(a.calib_chunks), "-o", str(out),
                      "--force", *extra)
            times[kind].append(time.perf_counter() - t0)
            if extra:
                found = doc["super_weights"]
    plain, sw = statistics.median(times["plain"]), statistics.median(times["super_weights"])
    print(f"imatrix, {a.calib_chunks} chunks: {plain:.1f} s; with --super-weights {sw:.1f} s "
          f"(+{100 * (sw / plain - 1):.1f} %; medians of {a.repeats})")
    for s in found["super_weights"]:
        effect = "-" if s["effect"] is None else f"{100 * s['effect']:+.2f}%"
        print(f"  {s['tensor']}[{s['row']}, {s['col']}] value {s['value']:.4g} spike {s['spike']:.0f}x "
              f"share {100 * s['share']:.0f}% effect {effect} ({'confirmed' if s['confirmed'] else 'candidate'})")

    rows = []
    for preset in a.presets.split(","):
        base = a.work / f"{preset}.gguf"
        run("quantize", str(a.model), str(base), "--type", preset, "--imatrix", str(im), "--force", "--no-check")
        p0, s0 = perplexity(base, a.text, a.chunks, a.threads), base.stat().st_size
        rows.append((preset, "-", s0, p0, 0.0, 0.0))
        for t in a.types.split(","):
            out = a.work / f"{preset}-{t}.gguf"
            doc = run("quantize", str(a.model), str(out), "--type", preset, "--imatrix", str(im),
                      "--protect-super-weights", "--super-weight-type", t, "--force", "--no-check")
            if not doc["protected"]:
                continue
            p, s = perplexity(out, a.text, a.chunks, a.threads), out.stat().st_size
            rows.append((preset, t, s, p, 100 * (s / s0 - 1), 100 * (1 - p / p0)))
            out.unlink()
        base.unlink()
    print(f"\nperplexity on {a.text.name}, {a.chunks} chunks (llama-perplexity):")
    print(f"{'preset':8s} {'protect':7s} {'bytes':>11s} {'size':>7s} {'ppl':>8s} {'lower ppl':>9s}")
    for preset, t, s, p, ds, dp in rows:
        print(f"{preset:8s} {t:7s} {s:11,d} {ds:+6.2f}% {p:8.4f} {dp:8.1f}%")


if __name__ == "__main__":
    main()
