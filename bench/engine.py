"""Calibration-engine throughput and peak memory: imatrix and perplexity, tokens/s, against
llama-imatrix / llama-perplexity measured in the same run when $QUANTCLI_LLAMA_BIN (or PATH) has them.

    python bench/engine.py MODEL.gguf TEXT.txt [--chunks 4] [--ctx 512] [--threads 2] [--repeat 3] [--only imatrix]

Every measurement runs in its own child process; tokens/s is chunks * ctx over the child's whole
wall time (loading and tokenizing included, for both tools), peak memory is the child's max RSS
(memory-mapped model pages it touched count, for both tools). Each tool runs once untimed (page
cache, numba's compiled kernels), then the timed runs alternate between the tools; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import llama_bin  # noqa: E402

CHILD = """
import sys
from pathlib import Path
from quantcli.calibrate.imatrix import ImatrixOptions, compute
from quantcli.engine.perplexity import PerplexityOptions, evaluate
kind, model, text, ctx, chunks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
text = Path(text).read_bytes().decode("utf-8")
if kind == "imatrix":
    compute(model, text, ImatrixOptions(ctx=ctx, chunks=chunks))
else:
    r = evaluate(model, text, PerplexityOptions(ctx=ctx, chunks=chunks))
    print(f"PPL {r.perplexity:.4f}")
"""


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB, stdout+stderr) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out[-2000:]}")
    return wall, usage.ru_maxrss / 1024 / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["imatrix", "perplexity"])
    args = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    tokens = args.chunks * args.ctx
    kinds = [args.only] if args.only else ["imatrix", "perplexity"]
    print(f"{args.chunks} chunks x {args.ctx} tokens, {args.threads} threads, median of {args.repeat}")
    print(f"{'task':<12}{'quantcli tok/s':>15}{'peak GB':>9}{'llama.cpp tok/s':>17}{'peak GB':>9}"
          f"{'speed':>8}{'memory':>8}")
    for kind in kinds:
        ours_cmd = [sys.executable, "-c", CHILD, kind, args.model, args.text, str(args.ctx), str(args.chunks)]
        tool = llama_bin("llama-imatrix" if kind == "imatrix" else "llama-perplexity")
        with tempfile.TemporaryDirectory() as tmp:
            ref_cmd = None
            if tool is not None:
                ref_cmd = [str(tool), "-m", args.model, "-f", args.text, "-c", str(args.ctx),
                           "--chunks", str(args.chunks), "-t", str(args.threads)]
                if kind == "imatrix":
                    ref_cmd += ["-o", str(Path(tmp) / "imatrix.gguf")]
            ours, ref = [], []
            for i in range(args.repeat + 1):  # run 0 is the untimed warm-up
                o = run_child(ours_cmd, env)
                r = run_child(ref_cmd, env) if ref_cmd else None
                if i:
                    ours.append(o)
                    if r:
                        ref.append(r)
        wall = statistics.median(w for w, _, _ in ours)
        rss = max(m for _, m, _ in ours)
        if not ref:
            print(f"{kind:<12}{tokens / wall:>15.1f}{rss:>9.2f}{'-':>17}{'-':>9}{'-':>8}{'-':>8}")
            continue
        lwall = statistics.median(w for w, _, _ in ref)
        lrss = max(m for _, m, _ in ref)
        print(f"{kind:<12}{tokens / wall:>15.1f}{rss:>9.2f}{tokens / lwall:>17.1f}{lrss:>9.2f}"
              f"{lwall / wall:>7.2f}x{rss / lrss:>7.2f}x")


if __name__ == "__main__":
    main()
