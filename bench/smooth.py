"""SmoothQuant on a real model: simulated W8A8 perplexity without and with smoothing.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/smooth.py [MODEL.gguf] [--text exodus.txt]
        [--calib genesis.txt] [--ctx 512] [--chunks 8] [--calib-chunks 512] [--only token|tensor|hybrid]
        [--gptq] [--channel-floor Q]

MODEL defaults to $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf (the F32 base of Gemma 3 270M). Rows:
the float model, then per activation mode (per-tensor static, per-token dynamic; `--only hybrid`:
static but ffn_down per token) the model without
smoothing and smoothed with alpha 0.5, 0.8 and auto, on the norm mappings and on all four. The
scales are calibrated on `--calib` (another text than the one scored; pass the eval text to
calibrate on it); `auto` searches alpha with the row's activation mode. Static per-tensor
activation scales come from the calibration text too, MSE-clipped for static and the maxima for
hybrid, as `smooth` chooses them (`--static-scales mse|max` for both): for a smoothed model
those `quantcli smooth` records, for the plain one those the static-scales observer gives, which is what `quantcli report --simulate w8a8:tensor --calib TEXT`
uses. Each evaluation is llama-perplexity's method (ctx, second half scored) through
`quantcli.engine.perplexity.evaluate`. With `--gptq`, every smoothed row is also scored with its
int8 weights rounded by GPTQ on the same calibration pass (what `smooth --format compressed-tensors
--gptq` writes), in a row of its own. `--channel-floor Q` smooths as `smooth --channel-floor Q`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import smoothing_args  # noqa: E402
from quantcli.calibrate.runner import RunOptions, run_calibration  # noqa: E402
from quantcli.calibrate.gptq import GPTQObserver  # noqa: E402
from quantcli.calibrate.smooth import (  # noqa: E402
    SmoothedReader, SmoothObserver, StaticScaleObserver, default_static_scales)
from quantcli.engine.model import Model  # noqa: E402
from quantcli.engine.perplexity import PerplexityOptions, evaluate  # noqa: E402
from quantcli.engine.tokenizer import Tokenizer  # noqa: E402
from quantcli.engine.w8a8 import W8A8  # noqa: E402
from quantcli.formats import open_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoothing_args(ap)
    ap.add_argument("--only", choices=("tensor", "token", "hybrid"), default=None)
    ap.add_argument("--channel-floor", type=float, default=0.0, help="smooth --channel-floor")
    ap.add_argument("--alphas", default="0.5,0.8,auto", help="comma-separated: numbers and/or auto")
    ap.add_argument("--mappings", default="norm,all", help="comma-separated: norm and/or all")
    ap.add_argument("--static-scales", choices=("mse", "max"), default=None,
                    help="static scales of every static mode (default: smooth's, mse for static, max for hybrid)")
    ap.add_argument("--gptq", action="store_true", help="also score each smoothed model with GPTQ's int8 weights")
    args = ap.parse_args()
    modes = [args.only] if args.only else ["tensor", "token"]
    alphas = [a if a == "auto" else float(a) for a in args.alphas.split(",")]
    with open_model(args.model) as reader:
        calib = Tokenizer.from_model(reader).encode(args.calib.read_text(), add_special=True, parse_special=False)
        print(f"model {args.model.name}; eval {args.text.name}, ctx {args.ctx}, {args.chunks} chunks; smoothing "
              f"calibrated on {args.calib.name}, {min(args.calib_chunks, len(calib) // args.ctx)} chunks", flush=True)
        run = RunOptions(ctx=args.ctx, chunks=args.calib_chunks)

        text = args.text.read_bytes().decode("utf-8")

        def ppl(r, simulate: W8A8 | None) -> float:
            return evaluate(r, text, PerplexityOptions(ctx=args.ctx, chunks=args.chunks, simulate=simulate)).perplexity

        def engine(mode: str, static: dict[str, float] | None) -> W8A8:
            return W8A8("token") if mode == "token" else W8A8(mode, act_max=static)

        def scales_of(mode: str) -> str:
            return args.static_scales or default_static_scales(mode)

        plain_static = {k: run_calibration(Model(reader), calib, run, [StaticScaleObserver(k)]).observers[0].result()
                        for k in sorted({scales_of(m) for m in modes if m != "token"})}

        t0 = time.perf_counter()
        base = ppl(reader, None)
        print(f"{'F32':<28} {base:8.4f}   ({time.perf_counter() - t0:.0f} s)", flush=True)
        smoothed: dict[tuple[str, object], object] = {}
        rows = []
        for mode in modes:
            t0 = time.perf_counter()
            p = ppl(reader, engine(mode, plain_static.get(scales_of(mode))))
            rows.append((mode, "none", "-", p, ""))
            print(f"{'W8A8 ' + mode + ', no smoothing':<28} {p:8.4f} {100 * (p / base - 1):+7.2f} %   "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            for maps in args.mappings.split(","):
                for alpha in alphas:
                    t0 = time.perf_counter()
                    key = (maps, alpha if alpha != "auto" else f"auto-{mode}", scales_of(mode))
                    if key not in smoothed:
                        observers = [SmoothObserver(alpha=alpha, mappings=maps, activations=mode,
                                                    static_scales=scales_of(mode),
                                                    channel_floor=args.channel_floor)]
                        observers += [GPTQObserver()] if args.gptq else []
                        run_calibration(Model(reader), calib, dataclasses.replace(run, kind="smooth"), observers)
                        smoothed[key] = [o.result() for o in observers]
                    res, *gptq = smoothed[key]
                    p = ppl(SmoothedReader(reader, res), engine(mode, res.static_max()))
                    chosen = " ".join("/".join(f"{layer.alpha_of(m):.2f}" for m in res.mappings)
                                      if len(set(layer.alphas.values())) > 1 else f"{layer.alpha:.2f}"
                                      for layer in res.layers.values()) if alpha == "auto" else ""
                    rows.append((mode, maps, alpha, p, chosen))
                    print(f"{f'W8A8 {mode}, {maps}, a={alpha}':<28} {p:8.4f} {100 * (p / base - 1):+7.2f} %   "
                          f"({time.perf_counter() - t0:.0f} s) {chosen}", flush=True)
                    if gptq:
                        g = gptq[0]
                        sim = dataclasses.replace(engine(mode, res.static_max()), rounded=g.weights)
                        p = ppl(SmoothedReader(reader, res), sim)
                        rows.append((mode, maps, f"{alpha}, GPTQ", p, ""))
                        summ = g.summary()
                        print(f"{f'W8A8 {mode}, {maps}, a={alpha}, GPTQ':<28} {p:8.4f} {100 * (p / base - 1):+7.2f} %"
                              f"   (weights' output error {summ['error_rtn']:.4g} -> {summ['error_gptq']:.4g})",
                              flush=True)

    print(f"\n| activations | mappings | alpha | perplexity | vs F32 ({base:.4f}) |")
    print("|---|---|---|---|---|")
    for mode, maps, alpha, p, _ in rows:
        label = {"tensor": "per-tensor static", "token": "per-token", "hybrid": "hybrid"}[mode]
        print(f"| {label} | {maps} | {alpha} | "
              f"{p:.4f} | {100 * (p / base - 1):+.2f} % |")
    for mode, maps, alpha, _, chosen in rows:
        if chosen:
            print(f"auto alpha per layer ({mode}, {maps}): {chosen}")


if __name__ == "__main__":
    main()
