"""Automatic mixes against llama.cpp's presets at the same file size, judged by llama.cpp itself.

    QUANTCLI_LLAMA_BIN=/path/to/llama.cpp/bin python bench/allocation.py [MODEL.gguf]
        [--imatrix FILE] [--calib genesis.txt] [--text exodus.txt] [--chunks 16]
        [--presets Q2_K,Q3_K_M,...] [--measurement FILE] [--work DIR] [--threads 2]

For each preset: `quantcli quantize --type PRESET --imatrix I` (llama-quantize's bytes) gives the
preset's file and its size S; `quantcli quantize --target-size S --imatrix I --measurement M` the
automatic mix (M is measured once on --calib, then reused). Both are scored with
`llama-perplexity --kl-divergence` against the base's logits (`--kl-divergence-base`, made once)
on --text: mean KLD and perplexity. The table ends with the mean relative KLD reduction over the
presets. Also printed: the mix's estimated KLD next to the measured one (how well the model of
err -> dKLD predicts).

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf, the imatrix to the shared reference's
imatrix-genesis.gguf.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import llama_bin  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
PRESETS = "Q2_K,Q3_K_M,Q4_K_M,IQ2_XXS,IQ3_XXS,IQ4_XS,IQ1_S"


def quantcli(*args: str) -> dict:
    cmd = [sys.executable, "-m", "quantcli", "quantize", *args, "--json", "--force", "--no-check"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr}")
    return json.loads(res.stdout)


def llama_kld(model: Path, logits: Path, text: Path, chunks: int, threads: int) -> tuple[float, float]:
    """(mean KLD, perplexity) as llama-perplexity --kl-divergence prints them."""
    exe = llama_bin("llama-perplexity")
    res = subprocess.run([str(exe), "-m", str(model), "-f", str(text), "-c", "512", "--chunks", str(chunks),
                          "-t", str(threads), "--kl-divergence-base", str(logits), "--kl-divergence"],
                         capture_output=True, text=True)
    out = res.stdout + res.stderr
    kld = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)", out)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.eE+-]+)", out)
    if res.returncode or not kld or not ppl:
        raise SystemExit(f"llama-perplexity failed on {model}:\n{out[-2000:]}")
    return float(kld.group(1)), float(ppl.group(1))


def base_logits(model: Path, text: Path, chunks: int, threads: int, work: Path) -> Path:
    """The base's logits on `text` for `--kl-divergence-base`, made once in `work`."""
    logits = work / f"base-{text.stem}-{chunks}.kld"
    if not logits.exists():
        subprocess.run([str(llama_bin("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "512",
                        "--chunks", str(chunks), "-t", str(threads), "--kl-divergence-base", str(logits)],
                       check=True, capture_output=True)
    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("QUANTCLI_MODEL_CACHE", "/tmp/qc/models"))
    ap.add_argument("model", type=Path, nargs="?", default=cache / "gemma3-270m-f32.gguf")
    ap.add_argument("--imatrix", type=Path, default=SHARED / "gemma3-270m" / "imatrix-genesis.gguf")
    ap.add_argument("--calib", type=Path, default=SHARED / "text" / "genesis.txt")
    ap.add_argument("--text", type=Path, default=SHARED / "text" / "exodus.txt")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--measurement", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qc/alloc"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra", default="", help="more quantize flags for the automatic mixes (space-separated)")
    args = ap.parse_args()
    if llama_bin("llama-perplexity") is None:
        raise SystemExit("llama-perplexity not found: set QUANTCLI_LLAMA_BIN")
    args.work.mkdir(parents=True, exist_ok=True)
    meas = args.measurement or args.work / "sensitivity.json"
    logits = base_logits(args.model, args.text, args.chunks, args.threads, args.work)
    if not meas.exists():
        t0 = time.perf_counter()
        quantcli(str(args.model), str(args.work / "probe.gguf"), "--target-bpw", "8", "--imatrix",
                 str(args.imatrix), "--calib", str(args.calib), "--measurement", str(meas), "--dry-run")
        print(f"measurement: {time.perf_counter() - t0:.0f} s -> {meas}", flush=True)
    print(f"{'preset':8} {'bytes':>11} | {'preset KLD':>10} {'PPL':>8} | {'auto bytes':>11} {'auto KLD':>10} "
          f"{'est.':>8} {'PPL':>8} | {'dKLD':>6}", flush=True)
    gains = []
    for preset in args.presets.split(","):
        pfile = args.work / f"{preset}.gguf"
        afile = args.work / f"{preset}-auto.gguf"
        p = quantcli(str(args.model), str(pfile), "--type", preset, "--imatrix", str(args.imatrix), "-q")
        size = pfile.stat().st_size
        a = quantcli(str(args.model), str(afile), "--target-size", str(size), "--imatrix", str(args.imatrix),
                     "--measurement", str(meas), "-q", *args.extra.split())
        pk, pp = llama_kld(pfile, logits, args.text, args.chunks, args.threads)
        ak, ap_ = llama_kld(afile, logits, args.text, args.chunks, args.threads)
        gain = 1 - ak / pk
        gains.append(gain)
        del p
        print(f"{preset:8} {size:11d} | {pk:10.5f} {pp:8.4f} | {afile.stat().st_size:11d} {ak:10.5f} "
              f"{a['allocation']['estimated_kld']:8.5f} {ap_:8.4f} | {100 * gain:5.1f}%", flush=True)
    print(f"mean KLD reduction over {len(gains)} presets: {100 * sum(gains) / len(gains):.1f}%")


if __name__ == "__main__":
    main()
