"""What `quantcli smooth` costs and what its output buys on this CPU.

    python bench/smooth_speed.py [MODEL_F32.gguf] [--calib genesis.txt] [--chunks 8] [--runs 3]
        [--alpha auto] [--mappings all] [--threads 2]

1. The time of `quantcli smooth` (GGUF Q8_0 output) against `quantcli imatrix` on the same chunks of
   the same text, each a fresh process, medians of --runs (wall and CPU seconds), and their ratio.
2. When llama.cpp's `llama-bench` is found ($QUANTCLI_LLAMA_BIN or PATH): prompt processing (pp512)
   and generation (tg128) tokens/s of the model as F16 (`quantcli quantize --type F16`) against the
   smoothed Q8_0 file, and the ratio. llama.cpp's CPU backend multiplies Q8_0 weights with
   activations quantized to int8 blocks (Q8_0 x Q8_0 dot products), i.e. it runs W8A8.

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import llama_bin  # noqa: E402

TEXTS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "text"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU user + system) seconds of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def llama_bench(exe: Path, model: Path, threads: int) -> dict[str, float]:
    """tokens/s of pp512 and tg128 (llama-bench's JSON output)."""
    out = subprocess.run([str(exe), "-m", str(model), "-t", str(threads), "-p", "512", "-n", "128",
                          "-r", "3", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {("pp" if r["n_prompt"] else "tg"): float(r["avg_ts"]) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("QUANTCLI_MODEL_CACHE", "/tmp/qc/models"))
    ap.add_argument("model", type=Path, nargs="?", default=cache / "gemma3-270m-f32.gguf")
    ap.add_argument("--calib", type=Path, default=TEXTS / "genesis.txt")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--alpha", default="auto")
    ap.add_argument("--mappings", default="all")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    exe = [sys.executable, "-m", "quantcli"]
    common = ["--chunks", str(args.chunks), "--ctx", str(args.ctx), "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        smoothed = t / "smoothed-q8_0.gguf"
        smooth = exe + ["smooth", str(args.model), "-o", str(smoothed), "--calib", str(args.calib),
                        "--alpha", args.alpha, "--mappings", args.mappings, "--force", *common]
        imatrix = exe + ["imatrix", str(args.model), "-f", str(args.calib), "-o", str(t / "imatrix.gguf"),
                         "--force", *common]
        rows = []
        for label, cmd in (("imatrix", imatrix), ("smooth", smooth)):
            got = [timed(cmd) for _ in range(args.runs)]
            wall, cpu = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
            rows.append((label, wall, cpu))
            print(f"{label:<8} wall {wall:7.1f} s   cpu {cpu:7.1f} s   (median of {args.runs})", flush=True)
        (_, w0, c0), (_, w1, c1) = rows
        print(f"smooth / imatrix: wall {w1 / w0:.2f}x, cpu {c1 / c0:.2f}x "
              f"({args.chunks} chunks of {args.ctx}, alpha {args.alpha}, mappings {args.mappings})")

        bench = llama_bin("llama-bench")
        if bench is None:
            print("llama-bench not found (set QUANTCLI_LLAMA_BIN): tokens/s skipped")
            return
        f16 = t / "f16.gguf"
        subprocess.run(exe + ["quantize", str(args.model), str(f16), "--type", "F16", "-q"], check=True)
        a, b = llama_bench(bench, f16, args.threads), llama_bench(bench, smoothed, args.threads)
        for k, name in (("pp", "prompt pp512"), ("tg", "generation tg128")):
            print(f"llama.cpp {name:<17} F16 {a[k]:8.1f} tok/s   smoothed Q8_0 {b[k]:8.1f} tok/s   "
                  f"{b[k] / a[k]:.2f}x  ({args.threads} threads)")


if __name__ == "__main__":
    main()
