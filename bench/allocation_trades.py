"""What a preset's file can trade at its own size, each trade scored by llama.cpp itself.

    QUANTCLI_LLAMA_BIN=/path/to/llama.cpp/bin python bench/allocation_trades.py [MODEL.gguf]
        [--preset Q4_K_M] [--imatrix FILE] [--text exodus.txt] [--chunks 16]
        [--trade ROLE:FROM=TO[+ROLE:FROM=TO...]]... [--work DIR] [--threads 2]

A trade moves every tensor of a role (ffn_down, attn_output, attn_q, ...) that the preset stores
as FROM to TO; every other tensor keeps the preset's type (pinned by exact name, so llama.cpp's
layer counting for use_more_bits does not shift). Each file is scored with `llama-perplexity
--kl-divergence` against the base's logits on --text. Printed per trade: the bytes it moves, the
change of mean KLD and of perplexity against the preset, and the KLD it buys or costs per MB.

A purchase adds bytes and lowers the KLD; a payment frees bytes and raises it. A mix of the
preset's size beats the preset only where some purchase buys more KLD per MB than some payment
costs. The default trades are the Q4_K_M ones of Gemma 3 270M: its lossless moves (to types that
hold the preset's grid and round the matmul's input in 32-blocks, Q8_0/Q8_1, instead of Q8_K's
256-blocks) and the cheapest lossy ones.

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf, the imatrix to the shared reference's
imatrix-genesis.gguf.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import TEXTS, llama_bin  # noqa: E402
from bench.allocation import SHARED, base_logits, llama_kld, quantcli  # noqa: E402

TRADES = (
    "ffn_down:Q4_K=Q4_1",  # lossless, Q8_K -> Q8_1 input rounding, +0.5 bpw
    "attn_output:Q4_K=Q4_1",
    "ffn_down:Q6_K=Q8_0",  # near-lossless, Q8_K -> Q8_0, +1.9 bpw
    "ffn_down:Q4_K=Q4_1+ffn_down:Q6_K=Q8_0",
    "ffn_down:Q4_K=IQ4_NL",  # the same bytes, 32-block rounding, a lossy grid
    "ffn_down:Q6_K=Q5_1",  # the cheapest lossy moves
    "ffn_down:Q6_K=Q5_K",
    "attn_v:Q8_0=Q5_1",
    "attn_q:Q5_0=Q4_1",
    "attn_k:Q5_0=Q4_1",
    "ffn_gate:Q5_0=Q4_1",
    "ffn_up:Q5_0=Q4_1",
    "ffn_down:Q4_K=Q4_1+ffn_down:Q6_K=Q5_1",
)


def role(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]


def parse_trade(spec: str) -> list[tuple[str, str, str]]:
    out = []
    for part in spec.split("+"):
        m = re.fullmatch(r"([A-Za-z0-9_]+):([A-Za-z0-9_]+)=([A-Za-z0-9_]+)", part.strip())
        if not m:
            raise SystemExit(f"--trade '{spec}': expected ROLE:FROM=TO[+ROLE:FROM=TO...], e.g. ffn_down:Q4_K=Q4_1")
        out.append((m.group(1), m.group(2).upper(), m.group(3).upper()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = Path(os.environ.get("QUANTCLI_MODEL_CACHE", "/tmp/qc/models"))
    ap.add_argument("model", type=Path, nargs="?", default=cache / "gemma3-270m-f32.gguf")
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--imatrix", type=Path, default=SHARED / "gemma3-270m" / "imatrix-genesis.gguf")
    ap.add_argument("--text", type=Path, default=TEXTS / "exodus.txt")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--trade", action="append", default=None, help="ROLE:FROM=TO[+...] (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qc/trades"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if llama_bin("llama-perplexity") is None:
        raise SystemExit("llama-perplexity not found: set QUANTCLI_LLAMA_BIN")
    trades = [(spec, parse_trade(spec)) for spec in (args.trade or TRADES)]
    args.work.mkdir(parents=True, exist_ok=True)
    logits = base_logits(args.model, args.text, args.chunks, args.threads, args.work)
    common = ["--type", args.preset, "--imatrix", str(args.imatrix), "-q"]
    plan = quantcli(str(args.model), str(args.work / "plan.gguf"), *common, "--dry-run")
    types = {t["name"]: t["type"] for t in plan["tensors"] if t["type"] != "F32"}
    base_file = args.work / f"{args.preset}.gguf"
    quantcli(str(args.model), str(base_file), *common)
    size0 = base_file.stat().st_size
    k0, p0 = llama_kld(base_file, logits, args.text, args.chunks, args.threads)
    print(f"{args.preset}: {size0} bytes, KLD {k0:.6f}, PPL {p0:.4f} ({args.text.name}, {args.chunks} chunks)")
    print(f"{'trade':42} {'tensors':>7} {'d bytes':>10} {'KLD':>9} {'d KLD':>8} {'PPL':>8} {'d PPL':>7} "
          f"{'KLD/MB':>9}", flush=True)
    for spec, moves in trades:
        new = dict(types)
        for r, frm, to in moves:
            for name, t in types.items():
                if role(name) == r and t == frm:
                    new[name] = to
        moved = sum(new[n] != types[n] for n in types)
        if not moved:
            print(f"{spec:42} {0:7d}  (the preset has no such tensor)", flush=True)
            continue
        rules = [x for n, t in new.items() for x in ("--tensor-type", f"^{re.escape(n)}$={t}")]
        out = args.work / "trade.gguf"
        quantcli(str(args.model), str(out), *common, *rules)
        size = out.stat().st_size
        k, p = llama_kld(out, logits, args.text, args.chunks, args.threads)
        # a trade between types of one size moves only the header's alignment: no rate per MB
        per_mb = f"{(k - k0) / ((size - size0) / 1e6):+9.2e}" if abs(size - size0) >= 65536 else f"{'same size':>9}"
        print(f"{spec:42} {moved:7d} {size - size0:+10d} {k:9.6f} {100 * (k / k0 - 1):+7.1f}% {p:8.4f} "
              f"{100 * (p / p0 - 1):+6.2f}% {per_mb}", flush=True)
        out.unlink()


if __name__ == "__main__":
    main()
