"""Memory at real sizes, and the calibration throughput behind SC-004's projection.

    python bench/scale.py memory  [--dir D] [--layers 2]   # 70B-shaped layers: peak RSS of quantize, imatrix
    python bench/scale.py sc004   [--dir D] [--chunks 2]   # 7B-shaped layers: tokens/s, projected imatrix time
    python bench/scale.py ray --model F32.gguf --calib T [--imatrix I]   # local vs --ray: same results?

`memory` writes a synthetic GGUF with Llama-3-70B's shapes (hidden 8192, FFN 28672, 64 heads / 8 KV
heads of 128, vocabulary 128256, tied embedding) and `--layers` blocks at full width, F16, streamed
to disk a slice at a time. It then runs, each in a child process whose peak RSS (ru_maxrss) is read
with wait4: `quantcli quantize --type Q4_K_M`, `quantcli imatrix` on one chunk of 512 tokens
(through the library: the file has no tokenizer, token ids are drawn at random), and a baseline
child that only imports quantcli and opens the file. The budgets it checks:

- quantize: the interpreter baseline + the slice window (`slices.IN_FLIGHT_BYTES`, 128 MiB) + one
  slice's output buffers; the 5.5 GB input is read with pread and never mapped resident;
- imatrix: the baseline + one layer's weights as float32 (what the engine multiplies by) + that
  layer's stored bytes (the page cache mapped while they are decoded) + the hidden states.

`ray` runs calibration on a real model (e.g. the F32 base of Gemma 3 270M) twice, each in a child
process with one BLAS thread: locally, and with `--ray` on a local cluster the run starts with this
machine's cores (one BLAS thread, so one CPU, per worker): `smooth` (GGUF bytes and scales JSON compared) and the
automatic mix's analysis (`quantize --target-size S --dry-run --measurement M`, the measurement
JSON compared without its `seconds`). It prints wall times and whether the results are equal.

`sc004` writes Llama-2-7B-shaped layers (hidden 4096, FFN 11008, 32 heads, vocabulary 32000),
times the layer-sequential pass of `imatrix` over `--chunks` chunks of 512 tokens (median of 3,
one layer's time from two runs of different depth), and projects a 512 x 512-token imatrix of the
32-layer model on 1, 4 and 16 such workers: blocks of 16 chunks are the unit of work, so 32 blocks
spread over the workers, each block also reading the whole model (13.5 GB of F16) once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "70b": dict(n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, head_dim=128, n_vocab=128256, n_layer_full=80),
    "7b": dict(n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, head_dim=128, n_vocab=32000, n_layer_full=32),
}


def write_shaped(path: Path, shape: dict, n_layer: int, seed: int = 0) -> int:
    """A llama GGUF of `shape` with n_layer blocks, F16 matrices (N(0, 0.02^2)) and F32 norms,
    written a slice of rows at a time: memory stays one slice. Returns the file's size."""
    from quantcli.formats import TensorSpec, create_writer

    e, f, hd = shape["n_embd"], shape["n_ff"], shape["head_dim"]
    q, kv = shape["n_head"] * hd, shape["n_head_kv"] * hd
    mats = [("token_embd.weight", shape["n_vocab"], e)]
    norms = ["output_norm.weight"]
    for il in range(n_layer):
        b = f"blk.{il}."
        norms += [b + "attn_norm.weight", b + "ffn_norm.weight"]
        mats += [(b + "attn_q.weight", q, e), (b + "attn_k.weight", kv, e), (b + "attn_v.weight", kv, e),
                 (b + "attn_output.weight", e, q), (b + "ffn_gate.weight", f, e), (b + "ffn_up.weight", f, e),
                 (b + "ffn_down.weight", e, f)]
    specs = [TensorSpec(n, (r, c), "F16") for n, r, c in mats] + [TensorSpec(n, (e,), "F32") for n in norms]
    meta = {"general.architecture": "llama", "general.name": "synthetic", "llama.context_length": 8192,
            "llama.embedding_length": e, "llama.block_count": n_layer, "llama.feed_forward_length": f,
            "llama.attention.head_count": shape["n_head"], "llama.attention.head_count_kv": shape["n_head_kv"],
            "llama.rope.dimension_count": hd, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.freq_base": 500000.0, "llama.vocab_size": shape["n_vocab"], "general.file_type": 1}
    rng = np.random.default_rng(seed)
    with create_writer("gguf", path, meta, specs) as w:
        for name, rows, cols in mats:
            step = max(1, (32 << 20) // (2 * cols))
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                w.write_rows(name, r0, (rng.standard_normal((r1 - r0, cols), np.float32) * 0.02)
                             .astype(np.float16).view(np.uint8).reshape(-1))
        for name in norms:
            w.write(name, (1 + 0.1 * rng.standard_normal(e)).astype(np.float32))
        w.finish()
    return path.stat().st_size


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of a command, its RSS from wait4 (ru_maxrss, KiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errs:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=errs)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        errs.seek(0)
        if status:
            raise SystemExit(f"{' '.join(cmd[:4])} failed: {errs.read().decode()[-2000:]}")
        return wall, usage.ru_maxrss / 2**20, out.read().decode()


def _child(code: str, *args: str) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of `python -c code args` in a child."""
    return _run([sys.executable, "-c", code, *args])


# the interpreter with the engine and the kernels loaded, on a tiny model: what every run costs
BASELINE = """
import sys, numpy as np
from quantcli.engine.model import Model
from quantcli.formats import open_model
from quantcli.calibrate.imatrix import ImatrixOptions, collect
from quantcli import codecs
codecs.load_kernels(decode={"F16", "Q4_K", "Q6_K"}, encode={"Q4_K", "Q6_K"}, weighted=False)
r = open_model(sys.argv[1]); m = Model(r)
collect(m, np.zeros((1, 64), np.int64) + 1, ImatrixOptions(ctx=64, chunks=1))
"""
IMATRIX = """
import sys, json, time, numpy as np
from quantcli.formats import open_model
from quantcli.engine.model import Model
from quantcli.calibrate.imatrix import ImatrixOptions, collect
r = open_model(sys.argv[1]); m = Model(r)
n_chunks, ctx = int(sys.argv[2]), int(sys.argv[3])
tokens = np.random.default_rng(0).integers(0, r.tensors["token_embd.weight"].shape[0], (n_chunks, ctx))
t = time.perf_counter(); res = collect(m, tokens, ImatrixOptions(ctx=ctx, chunks=n_chunks))
print(json.dumps({"seconds": time.perf_counter() - t, "entries": len(res.imatrix.entries)}))
"""


def memory(args: argparse.Namespace) -> None:
    from quantcli.pipelines.slices import IN_FLIGHT_BYTES, chunk_bytes

    shape = SHAPES["70b"]
    d = Path(args.dir or tempfile.mkdtemp(prefix="quantcli-scale-"))
    src = d / "70b-shaped.gguf"
    if not src.exists():
        t = time.perf_counter()
        size = write_shaped(src, shape, args.layers)
        print(f"wrote {src}: {size / 1e9:.2f} GB ({args.layers} blocks at 70B width) in {time.perf_counter() - t:.0f} s")
    size = src.stat().st_size
    tiny = d / "tiny-shaped.gguf"
    if not tiny.exists():
        write_shaped(tiny, dict(n_embd=256, n_ff=512, n_head=4, n_head_kv=2, head_dim=64, n_vocab=1024), 1)
    _, base, _ = _child(BASELINE, str(tiny))
    wall, q_rss, _ = _run([sys.executable, "-m", "quantcli", "quantize", str(src), str(d / "q4km.gguf"), "--type",
                        "Q4_K_M", "-q", "--force"])
    threads = os.cpu_count() or 1
    q_budget = base + (IN_FLIGHT_BYTES + 2 * chunk_bytes(threads)) / 2**30
    print(f"quantize Q4_K_M: {wall:.0f} s, peak RSS {q_rss:.2f} GiB = {q_rss / q_budget:.2f}x the budget "
          f"(input {size / 2**30:.2f} GiB; budget: interpreter {base:.2f} + window {IN_FLIGHT_BYTES / 2**30:.3f} "
          f"+ buffers = {q_budget:.2f} GiB)")
    e, f, hd = shape["n_embd"], shape["n_ff"], shape["head_dim"]
    layer_params = 2 * e * shape["n_head"] * hd + 2 * e * shape["n_head_kv"] * hd + 3 * e * f
    hidden = args.chunks * 512 * e * 4
    largest = f * e * 2  # the biggest tensor's stored bytes, mapped while it is decoded
    acts = 3 * 512 * f * 4  # one chunk's FFN activations (gate, up, their product)
    i_wall, i_rss, out = _child(IMATRIX, str(src), str(args.chunks), "512")
    i_budget = base + (layer_params * 4 + largest + hidden + acts) / 2**30
    print(f"imatrix ({args.chunks} chunk of 512): {json.loads(out)['seconds']:.0f} s, peak RSS {i_rss:.2f} GiB = "
          f"{i_rss / i_budget:.2f}x the budget (interpreter {base:.2f} + one layer's float32 weights "
          f"{layer_params * 4 / 2**30:.2f} + the largest tensor's F16 pages {largest / 2**30:.2f} + hidden states "
          f"{hidden / 2**30:.3f} + one chunk's activations {acts / 2**30:.2f} = {i_budget:.2f} GiB)")


def sc004(args: argparse.Namespace) -> None:
    shape = SHAPES["7b"]
    d = Path(args.dir or tempfile.mkdtemp(prefix="quantcli-scale-"))
    times = {}
    for n_layer in (1, 3):
        src = d / f"7b-shaped-{n_layer}.gguf"
        if not src.exists():
            write_shaped(src, shape, n_layer)
        runs = [json.loads(_child(IMATRIX, str(src), str(args.chunks), "512")[2])["seconds"] for _ in range(3)]
        times[n_layer] = statistics.median(runs)
    per_layer = (times[3] - times[1]) / 2  # one layer over the chunks, load and decode of its weights included
    tokens = args.chunks * 512
    layer_tps = tokens / per_layer
    model_tps = layer_tps / shape["n_layer_full"]
    total_tokens = 512 * 512
    blocks = 512 // 16
    model_gb = 6.74e9 * 2 / 1e9
    read_s = model_gb / args.read_gbps  # each block task reads the whole model once
    print(f"7B-shaped layer (hidden 4096, FFN 11008, 32 heads): {per_layer:.2f} s per layer for {tokens} tokens "
          f"-> {layer_tps:.0f} tokens/s per layer, {model_tps:.1f} tokens/s for 32 layers "
          f"(1 layer {times[1]:.2f} s, 3 layers {times[3]:.2f} s; {os.cpu_count()} cores)")
    print(f"projected imatrix of a 7B model, 512 chunks x 512 tokens ({total_tokens} tokens, {blocks} blocks of 16):")
    print("| workers | hours | 30-minute target |")
    print("|---|---|---|")
    for n in (1, 4, 16, blocks):
        rounds = math.ceil(blocks / n)
        seconds = rounds * (16 * 512 / model_tps + read_s)
        print(f"| {n} | {seconds / 3600:.1f} | {'met' if seconds <= 1800 else 'not met'} |")


def ray(args: argparse.Namespace) -> None:
    import hashlib

    if not args.model or not args.calib:
        raise SystemExit("ray: give --model and --calib")
    work = Path(args.dir or tempfile.mkdtemp(prefix="quantcli-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}
    qc = [sys.executable, "-m", "quantcli"]

    def timed(cmd: list[str]) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd[2:5])} failed: {proc.stderr[-2000:]}")
        return time.perf_counter() - t0

    def measurement(path: Path) -> dict:
        doc = json.loads(path.read_text())
        doc.pop("seconds")
        return doc

    env.pop("RAY_ADDRESS", None)  # each --ray run starts a local cluster of this machine's cores
    print("| run | local s | --ray s | equal |\n|---|---:|---:|---|")
    smooth = ["smooth", args.model, "--calib", args.calib, "--chunks", str(args.chunks), "--alpha",
              args.alpha, "--mappings", "all", "--activations", "static", "-q"]
    times = []
    for tag, extra in (("local", []), ("ray", ["--ray"])):
        out = work / f"smooth-{tag}.gguf"
        times.append(timed(qc + smooth + ["-o", str(out), "--scales-out", str(out.with_suffix(".json")),
                                         "--force"] + extra))
    same = all(hashlib.sha256((work / f"smooth-local{s}").read_bytes()).digest()
               == hashlib.sha256((work / f"smooth-ray{s}").read_bytes()).digest() for s in (".gguf", ".json"))
    print(f"| smooth, alpha {args.alpha}, all mappings, static, {args.chunks} chunks | {times[0]:.0f} | "
          f"{times[1]:.0f} | {'yes' if same else 'NO'} |")
    alloc = ["quantize", args.model, str(work / "mix.gguf"), "--target-size", args.target_size, "--calib",
             args.calib, "--dry-run", "-q"] + (["--imatrix", args.imatrix] if args.imatrix else [])
    times = []
    for tag, extra in (("local", []), ("ray", ["--ray"])):
        m = work / f"measurement-{tag}.json"
        m.unlink(missing_ok=True)
        times.append(timed(qc + alloc + ["--measurement", str(m)] + extra))
    same = measurement(work / "measurement-local.json") == measurement(work / "measurement-ray.json")
    print(f"| automatic-mix analysis (imatrix {'given' if args.imatrix else 'from --calib'}, sensitivity) | "
          f"{times[0]:.0f} | {times[1]:.0f} | {'yes' if same else 'NO'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("memory", "sc004", "ray"))
    ap.add_argument("--dir", help="where the synthetic models go (kept; default: a new temporary folder)")
    ap.add_argument("--layers", type=int, default=2, help="memory: full-width blocks in the 70B-shaped file")
    ap.add_argument("--chunks", type=int, default=1, help="chunks of 512 tokens per measured run")
    ap.add_argument("--read-gbps", type=float, default=1.0, help="sc004: shared-storage read speed per worker")
    ap.add_argument("--model", help="ray: the model both runs read")
    ap.add_argument("--calib", help="ray: the calibration text")
    ap.add_argument("--imatrix", help="ray: the automatic mix's imatrix (default: computed from --calib)")
    ap.add_argument("--target-size", default="240MB", help="ray: the automatic mix's target")
    ap.add_argument("--alpha", default="0.8", help="ray: smooth's alpha")
    args = ap.parse_args()
    {"memory": memory, "sc004": sc004, "ray": ray}[args.what](args)


if __name__ == "__main__":
    main()
