"""llama-imatrix's statistic gathered through the engine: hand-computable sums, every matmul of
every layer, --process-output, --in-file merging, checkpoints that resume to identical bytes,
and the real model against llama-imatrix's own file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantcli.calibrate import imatrix_file as imf
from quantcli.calibrate.imatrix import Collector, ImatrixOptions, collect, compute, load_imatrix, merge
from quantcli.engine.model import Model, forward
from quantcli.engine.perplexity import chunk_tokens
from quantcli.progress import Progress
from quantcli.errors import UsageError
from quantcli.formats import open_model
from tests.models import write_model

DATA = Path(__file__).parent.parent / "data" / "engine"
WEIGHTS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m.gguf", "gemma3", n_layer=3, sliding_window=12, tied=False)


def tokens(n: int = 130, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 275, n)


def test_collector_sums_squares_per_column():
    c = Collector()
    x = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    c("w", x)
    c("w", np.ones((16, 3), np.float32))
    c("w", np.ones((15, 3), np.float32))  # fewer than 16 rows: ignored, as llama-imatrix
    assert c.counts["w"] == 48
    assert np.array_equal(c.sums["w"], (x.astype(np.float64) ** 2).sum(0) + 16)


def test_every_layer_matmul_with_all_positions(model_path):
    with open_model(model_path) as r:
        m = Model(r)
        res = collect(m, tokens(), ImatrixOptions(ctx=32))
        # brute force: the same hook on the chunk-by-chunk whole-model forward
        ref = Collector()
        forward(m, chunk_tokens(tokens(), 32, None, 2, True), hook=ref)
    im = res.imatrix
    assert sorted(im.entries) == sorted(f"blk.{i}.{w}.weight" for i in range(3) for w in WEIGHTS)
    assert res.chunks == 4 and im.chunk_count == 4 and im.chunk_size == 32
    for name, e in im.entries.items():
        assert e.counts.tolist() == [4 * 32]
        assert np.allclose(e.sums[0], ref.sums[name], rtol=1e-6)
    q, k, v = (im.entries[f"blk.1.{w}.weight"].sums for w in ("attn_q", "attn_k", "attn_v"))
    assert np.array_equal(q, k) and np.array_equal(q, v)  # one input, three matmuls


def test_process_output_only_for_an_untied_output(model_path, tmp_path):
    with open_model(model_path) as r:
        out = collect(Model(r), tokens(), ImatrixOptions(ctx=32, process_output=True)).imatrix
    assert out.entries["output.weight"].counts.tolist() == [128]
    tied = write_model(tmp_path / "tied.gguf", "llama", tied=True)
    with open_model(tied) as r:
        res = collect(Model(r), tokens(), ImatrixOptions(ctx=32, process_output=True)).imatrix
    assert not any(n.startswith(("output", "token_embd")) for n in res.entries)  # llama skips token_embd


def test_small_context_is_refused(model_path):
    with open_model(model_path) as r, pytest.raises(UsageError, match="below 16"):
        collect(Model(r), tokens(), ImatrixOptions(ctx=8))


def test_written_file_loads_as_llama_quantize_reads_it(model_path, tmp_path):
    res = compute(model_path, "the heat in the hearth " * 30, ImatrixOptions(ctx=32, dataset="t.txt"))
    out = tmp_path / "imatrix.gguf"
    imf.save_gguf(res.imatrix, out)
    back = imf.load(out)
    assert back.datasets == ["t.txt"] and back.chunk_size == 32 and back.chunk_count == res.chunks
    imp = load_imatrix(out)
    for name, e in res.imatrix.entries.items():
        assert np.array_equal(imp[name], (e.sums[0] / e.counts[0]).astype(np.float32))
    dat = tmp_path / "imatrix.dat"
    imf.save_legacy(res.imatrix, dat)
    legacy = load_imatrix(dat)
    assert all(np.allclose(legacy[n], imp[n], rtol=1e-6) for n in imp)


def test_merge_in_files_like_llama(model_path, tmp_path):
    with open_model(model_path) as r:
        m = Model(r)
        a = collect(m, tokens(seed=1), ImatrixOptions(ctx=32, dataset="a.txt")).imatrix
        b = collect(m, tokens(seed=2), ImatrixOptions(ctx=32, dataset="b.txt")).imatrix
    imf.save_gguf(a, tmp_path / "a.gguf")
    imf.save_legacy(a, tmp_path / "a.dat")
    merged = merge(b, [imf.load(tmp_path / "a.gguf")], 32)
    assert merged.datasets == ["a.txt", "b.txt"] and merged.chunk_count == 8
    name = "blk.2.ffn_down.weight"
    assert merged.entries[name].counts.tolist() == [256]
    assert np.allclose(merged.entries[name].sums, a.entries[name].sums + b.entries[name].sums, rtol=1e-6)
    # legacy: mean * ncall with ncall = 4 chunks, read back times chunk_size
    legacy = merge(None, [imf.load(tmp_path / "a.dat")], 32)
    assert legacy.entries[name].counts.tolist() == [128]
    assert np.allclose(legacy.entries[name].sums, a.entries[name].sums, rtol=1e-5)
    # combining files only (no text)
    only = compute(None, None, ImatrixOptions(ctx=32, in_files=(tmp_path / "a.gguf",)))
    assert np.array_equal(only.imatrix.entries[name].sums, a.entries[name].sums)


class Boom(Exception):
    pass


def test_resume_after_failure_writes_identical_bytes(model_path, tmp_path):
    opts = ImatrixOptions(ctx=32, dataset="t.txt", checkpoint_dir=tmp_path / "ck")
    toks = tokens(200)
    with open_model(model_path) as r:
        m = Model(r)
        clean = collect(m, toks, ImatrixOptions(ctx=32, dataset="t.txt")).imatrix

        def fail_after_layer_1(ev: Progress) -> None:
            if ev.stage == "layer" and ev.done == 2:
                raise Boom

        with pytest.raises(Boom):
            collect(m, toks, opts, progress=fail_after_layer_1)
        assert (tmp_path / "ck" / "manifest.json").exists()
        logs: list[str] = []
        resumed = collect(m, toks, opts, log=logs.append)
    assert resumed.resumed_layers == 2 and any("resuming after layer 1" in s for s in logs)
    assert not (tmp_path / "ck").exists()  # removed after success
    imf.save_gguf(clean, tmp_path / "clean.gguf")
    imf.save_gguf(resumed.imatrix, tmp_path / "resumed.gguf")
    assert (tmp_path / "clean.gguf").read_bytes() == (tmp_path / "resumed.gguf").read_bytes()


def test_checkpoint_of_another_run_is_not_reused(model_path, tmp_path):
    ck = tmp_path / "ck"
    with open_model(model_path) as r:
        m = Model(r)

        def stop(ev: Progress) -> None:
            if ev.stage == "layer" and ev.done == 2:
                raise Boom

        with pytest.raises(Boom):
            collect(m, tokens(200), ImatrixOptions(ctx=32, checkpoint_dir=ck), progress=stop)
        logs: list[str] = []
        other = collect(m, tokens(200, seed=9), ImatrixOptions(ctx=32, checkpoint_dir=ck), log=logs.append)
        fresh = collect(m, tokens(200, seed=9), ImatrixOptions(ctx=32))
    assert other.resumed_layers == 0 and any("different" in s for s in logs)
    for name, e in fresh.imatrix.entries.items():
        assert np.array_equal(other.imatrix.entries[name].sums, e.sums)


def test_real_model_matches_llama_imatrix(real_f32, tmp_path):
    """llama-imatrix -m f32.gguf -f genesis.txt -c 512 --chunks 16 (reference file)."""
    ref = imf.load(DATA / "imatrix-genesis-16.gguf")
    text = (DATA / "genesis.txt").read_bytes().decode("utf-8")
    res = compute(real_f32, text, ImatrixOptions(ctx=512, chunks=16, dataset="text/genesis.txt"))
    got = res.imatrix
    assert sorted(got.entries) == sorted(ref.entries)
    assert (got.chunk_count, got.chunk_size, got.datasets) == (16, 512, ["text/genesis.txt"])
    for name, e in ref.entries.items():
        assert got.entries[name].counts.tolist() == e.counts.tolist()
        rel = np.linalg.norm(got.entries[name].sums - e.sums) / np.linalg.norm(e.sums)
        assert rel < 0.01, name


def test_sigkill_at_random_moments_then_resume_writes_the_same_file(tmp_path):
    """SIGKILL `quantcli imatrix` at random moments; each re-run resumes from the layer checkpoints
    and the final file equals an uninterrupted run's, byte for byte."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    model = write_model(tmp_path / "m.gguf", "gemma3", n_layer=6, n_embd=256, n_head=4, n_head_kv=2,
                        head_dim=64, n_ff=1024, sliding_window=64)
    text = tmp_path / "t.txt"
    text.write_text("In the beginning God created the heaven and the earth. And the earth was without form. " * 800)

    def cli(out):
        return subprocess.Popen([sys.executable, "-m", "quantcli", "imatrix", str(model), "-f", str(text),
                                 "-o", str(out), "--ctx", "256", "--chunks", "24", "-q"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parents[2], env=os.environ.copy())

    ref = tmp_path / "ref.gguf"
    t0 = time.perf_counter()
    p = cli(ref)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    full = time.perf_counter() - t0
    out = tmp_path / "out.gguf"
    rng = random.Random(7)
    for _ in range(8):
        p = cli(out)
        time.sleep(rng.uniform(0.3, full))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert not out.exists() or out.read_bytes() == ref.read_bytes()
        if out.exists():
            out.unlink()
    p = cli(out)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert out.read_bytes() == ref.read_bytes()
