"""Where static per-tensor W8A8 loses perplexity on a smoothed model: ablations of one smoothed model.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/smooth_static.py [MODEL.gguf]
        [--text exodus.txt] [--calib genesis.txt] [--calib-chunks 512] [--ctx 512] [--chunks 8]
        [--alpha auto] [--per-layer]

The model (default $QUANTCLI_MODEL_CACHE/gemma3-270m-f32.gguf) is smoothed once as `quantcli smooth
--mappings all --activations static` does (on --calib, as many chunks as it holds up to
--calib-chunks), then scored as static W8A8 (`report --simulate w8a8:tensor` with the recorded
scales) on --text and on the calibration text itself, with variations:

- one kind of block linear left in float (weights and input: what `--keep-problem-layers` does), for
  each of the four block inputs; with --per-layer also each layer's ffn_down alone;
- ffn_down's static scales (or every input's) multiplied by 1.25, 1.5 or 2 (less clipping, coarser
  steps), and the unclipped calibration maxima instead of the MSE clips.

Each row is llama-perplexity's method through `quantcli.engine.perplexity.evaluate`; with the
simulation's `Saturation` it also gives the share of token inputs clipped and the largest overshoot.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._util import smoothing_args  # noqa: E402
from quantcli.calibrate.runner import RunOptions  # noqa: E402
from quantcli.calibrate.smooth import SmoothedReader, smooth_model  # noqa: E402
from quantcli.engine.model import Model  # noqa: E402
from quantcli.engine.perplexity import PerplexityOptions, evaluate  # noqa: E402
from quantcli.engine.tokenizer import Tokenizer  # noqa: E402
from quantcli.engine.w8a8 import W8A8, Saturation  # noqa: E402
from quantcli.formats import open_model  # noqa: E402
INPUTS = {"q/k/v": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
          "gate/up": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoothing_args(ap)
    ap.add_argument("--alpha", default="auto")
    ap.add_argument("--per-layer", action="store_true", help="also each layer's ffn_down alone in float")
    args = ap.parse_args()
    alpha = args.alpha if args.alpha == "auto" else float(args.alpha)

    with open_model(args.model) as reader:
        calib = Tokenizer.from_model(reader).encode(args.calib.read_text(), add_special=True, parse_special=False)
        n_calib = min(args.calib_chunks, len(calib) // args.ctx)
        t0 = time.perf_counter()
        res = smooth_model(Model(reader), calib, RunOptions(ctx=args.ctx, chunks=n_calib), alpha=alpha,
                           mappings="all", activations="tensor")
        print(f"{args.model.name} smoothed (alpha {args.alpha}, all mappings, static) on {args.calib.name}, "
              f"{n_calib} chunks, in {time.perf_counter() - t0:.0f} s", flush=True)
        smoothed = SmoothedReader(reader, res)
        static, maxima = res.static_max(), res.act_max()
        n_layer = len(res.layers)
        texts = {args.text.name: args.text.read_text(), args.calib.name: args.calib.read_text()}
        base = {name: evaluate(reader, t, PerplexityOptions(ctx=args.ctx, chunks=args.chunks)).perplexity
                for name, t in texts.items()}

        def row(label: str, act_max: dict[str, float], keep: frozenset[str] = frozenset(),
                text: str = args.text.name) -> None:
            sat = Saturation()
            t0 = time.perf_counter()
            p = evaluate(smoothed, texts[text], PerplexityOptions(ctx=args.ctx, chunks=args.chunks, simulate=W8A8(
                "tensor", act_max=act_max, keep=keep, saturation=sat))).perplexity
            s = sat.summary()
            print(f"| {text} | {label} | {p:.4f} | {100 * (p / base[text] - 1):+.2f} % | "
                  f"{100 * s['clipped_share']:.2f} % | {s['max_overshoot']:.2f}× | "
                  f"{time.perf_counter() - t0:.0f} s |", flush=True)

        def scaled(factor: float, shorts: tuple[str, ...] | None) -> dict[str, float]:
            return {k: v * factor if shorts is None or k.split(".")[2] in shorts else v for k, v in static.items()}

        def linears(shorts: tuple[str, ...], layers: range) -> frozenset[str]:
            return frozenset(f"blk.{il}.{s}.weight" for il in layers for s in shorts)

        print(f"\nF32: {', '.join(f'{k} {v:.4f}' for k, v in base.items())}")
        print("| text | static W8A8 | perplexity | vs F32 | token inputs clipped | max overshoot | time |")
        print("|---|---|---|---|---|---|---|")
        for name in texts:
            row("all int8, recorded (MSE) scales", static, text=name)
        for label, shorts in INPUTS.items():
            row(f"{label} in float", static, linears(shorts, range(n_layer)))
        for factor in (1.25, 1.5, 2.0):
            row(f"ffn_down scales × {factor}", scaled(factor, ("ffn_down",)))
            row(f"every scale × {factor}", scaled(factor, None))
        row("ffn_down at its calibration maximum", {k: maxima[k] if "ffn_down" in k else v for k, v in static.items()})
        row("every input at its calibration maximum", maxima)
        if args.per_layer:
            for il in range(n_layer):
                row(f"blk.{il}.ffn_down in float", static, linears(("ffn_down",), range(il, il + 1)))


if __name__ == "__main__":
    main()
