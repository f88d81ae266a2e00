"""The seeds' falsification tests run against the installed quantcli (`verify --contracts`).

spec/000 (quantization ordering and LoRA scaling) and spec/001 (the symmetric 4-bit code), each
test by its ID, on quantcli's own code paths: the codecs, the LoRA merge, the planner.

    FALSIFY-QO-001    bytes strictly increase Q4_K < Q6_K < Q8_0 < F16 < F32 for the same weights
    FALSIFY-QO-002    a merged LoRA update is exactly (alpha / rank) * B @ A (alpha/sqrt(r) with rsLoRA)
    FALSIFY-QO-003    a 9B-parameter model plans to ~5 / 7 / 9 / 18 GB at Q4_K / Q6_K / Q8_0 / F16 (20 %)
    FALSIFY-QO-004    E[dropout mask] = 1 - p; the merge (inference, p = 0) keeps the expected output
    FALSIFY-QO-005    the lane-vectorised kernels equal their scalar reference ports, bit for bit
    FALSIFY-QUANT-001 SYM4_B64 round trip: |x - x_hat| < scale, q in [-7, 7], MSE <= scale^2 / 4
    FALSIFY-QUANT-002 zeros quantize to q = 0 and decode to 0
    FALSIFY-QUANT-003 64-value blocks quantize independently
    FALSIFY-QUANT-004 odd lengths pack into nibble pairs
    FALSIFY-QUANT-005 compression 32 / (4 + 32/64) = 7.1x against float32

Each returns (ok, figure, detail). Everything is seeded: the same quantcli gives the same figures.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

Result = tuple[bool, Any, str]

SIZE_ORDER = ("Q4_K", "Q6_K", "Q8_0", "F16", "F32")
# QO-003: a 9B-parameter model (Qwen3.5-sized) at Q4_K / Q6_K / Q8_0 / F16 is ~5 / 7 / 9 / 18 GB, within 20 %
CONCRETE_GB = {"Q4_K": 5.0, "Q6_K": 7.0, "Q8_0": 9.0, "F16": 18.0}
CONCRETE_TOLERANCE = 0.2
# the 9B shape planned: qwen3 (q/k norms, GQA 32/8 heads of 128, untied output), 40 blocks
SHAPE_9B = dict(arch="qwen3", n_embd=4096, n_layer=40, n_ff=12288, n_head=32, n_head_kv=8, head_dim=128,
                n_vocab=151936)


def qo_001() -> Result:
    from quantcli import codecs

    x = np.random.default_rng(6).standard_normal((4, 1024)).astype(np.float32)
    written = {t: codecs.quantize(x, t).nbytes for t in SIZE_ORDER}
    per = {t: n / x.size for t, n in written.items()}
    ok = all(written[a] < written[b] for a, b in zip(SIZE_ORDER, SIZE_ORDER[1:]))
    ratios = " : ".join(f"{written[t] / written['Q4_K']:.2f}" for t in SIZE_ORDER)
    return ok, per, (" < ".join(f"{t} {per[t]:.4f}" for t in SIZE_ORDER)
                     + f" bytes/param as the codecs write them; ratios {ratios} (the spec's ~1 : 1.5 : 2 : 4 : 8)")


class _LoraBench:
    """One base linear (HF-named safetensors) and PEFT adapters for it, in a scratch folder."""

    MODULE = "model.layers.0.self_attn.q_proj"

    def __init__(self, root: Path, n: int = 64, seed: int = 2) -> None:
        from safetensors.numpy import save_file

        rng = np.random.default_rng(seed)
        self.root = root
        self.w = rng.standard_normal((n, n)).astype(np.float32)
        self.base = root / "base.safetensors"
        save_file({self.MODULE + ".weight": self.w}, str(self.base))
        self.n, self.rng = n, rng

    def adapter(self, name: str, r: int, alpha: float, rslora: bool = False, dropout: float = 0.0):
        from safetensors.numpy import save_file

        rng = np.random.default_rng(r)
        a = (rng.standard_normal((r, self.n)) / math.sqrt(self.n)).astype(np.float32)
        b = (rng.standard_normal((self.n, r)) * 0.1).astype(np.float32)
        d = self.root / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": dropout,
            "target_modules": ["q_proj"], "fan_in_fan_out": False}))
        save_file({f"base_model.model.{self.MODULE}.lora_A.weight": a,
                   f"base_model.model.{self.MODULE}.lora_B.weight": b}, str(d / "adapter_model.safetensors"))
        return d, a, b

    def merged(self, adapter: Path) -> np.ndarray:
        from quantcli.convert.lora import AdapterSpec, merged
        from quantcli.formats import open_model

        with open_model(self.base) as base:
            return merged(base, [AdapterSpec(adapter, 1.0)]).load_f32(self.MODULE + ".weight")


def _fitted_scale(delta: np.ndarray, ba: np.ndarray) -> float:
    """The least-squares s of delta = s * B @ A."""
    d, u = delta.astype(np.float64).ravel(), ba.astype(np.float64).ravel()
    return float(d @ u / (u @ u))


def qo_002() -> Result:
    with tempfile.TemporaryDirectory(prefix="quantcli-contracts-") as tmp:
        bench = _LoraBench(Path(tmp))
        figures, ok = {}, True
        for name, r, alpha, rslora, want in (("std", 64, 16, False, 0.25), ("r8", 8, 16, False, 2.0),
                                             ("rs", 64, 16, True, 2.0)):
            d, a, b = bench.adapter(name, r, alpha, rslora)
            s = _fitted_scale(bench.merged(d) - bench.w, b @ a)
            figures[name] = s
            ok &= abs(s - want) <= 1e-5 * want
    return ok, figures, (f"alpha 16, rank 64: update scaled {figures['std']:.6f} (expected 0.25); alpha 16, "
                         f"rank 8: {figures['r8']:.6f} (2); rsLoRA alpha 16 / sqrt(64): {figures['rs']:.6f} (2)")


def qo_003() -> Result:
    from quantcli.plan import PlanOptions, make_plan

    shape = _Shape(**SHAPE_9B)
    params = sum(i.n_params for i in shape.tensors.values())
    sizes, ok = {}, True
    for type_name, gb in CONCRETE_GB.items():
        plan = make_plan(shape, PlanOptions(preset=type_name, pure=True, dry_run=True), has_imatrix=False)
        sizes[type_name] = plan.bytes
        ok &= abs(plan.bytes / 1e9 - gb) <= CONCRETE_TOLERANCE * gb
    return ok, sizes, (f"a {params / 1e9:.2f}B-parameter {SHAPE_9B['arch']}-shaped model: "
                       + ", ".join(f"{t} {sizes[t] / 1e9:.2f} GB ({gb:g})" for t, gb in CONCRETE_GB.items())
                       + f", each within {100 * CONCRETE_TOLERANCE:.0f}%")


def qo_004() -> Result:
    rng = np.random.default_rng(4)
    n = 200_000
    means, ok = {}, True
    for p in (0.1, 0.3, 0.5):
        keep = rng.random(n) >= p  # the Bernoulli(1 - p) mask
        means[p] = float(keep.mean())
        ok &= abs(means[p] - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n)
    with tempfile.TemporaryDirectory(prefix="quantcli-contracts-") as tmp:
        bench = _LoraBench(Path(tmp))
        d0, a, b = bench.adapter("p0", 8, 16, dropout=0.0)
        d3, _, _ = bench.adapter("p3", 8, 16, dropout=0.3)
        m0, m3 = bench.merged(d0), bench.merged(d3)
        same = bool(np.array_equal(m0, m3))
        # the training-time output with inverted dropout, averaged over masks, is the merged output
        x = np.random.default_rng(5).standard_normal(bench.n)
        masks = (np.random.default_rng(6).random((20_000, bench.n)) >= 0.3) / 0.7
        train = bench.w.astype(np.float64) @ x + 2.0 * ((masks * x) @ a.T.astype(np.float64)) @ b.T.astype(np.float64)
        gap = np.abs(train.mean(axis=0) - m3.astype(np.float64) @ x)
        sem = train.std(axis=0) / math.sqrt(len(masks))
        expect_ok = bool((gap <= 5 * sem + 1e-5).all())
    ok &= same and expect_ok
    return ok, {"mask_mean": means, "merge_ignores_dropout": same, "max_gap_in_sem": float((gap / sem).max())}, (
        "E[mask] = " + ", ".join(f"{m:.4f} (1-p {1 - p:.1f})" for p, m in means.items())
        + f"; merge with lora_dropout 0.3 {'equals' if same else 'DIFFERS from'} p = 0; expected training "
          f"output within {float((gap / sem).max()):.1f} standard errors of the merged one")


def qo_005() -> Result:
    """The lane-vectorised searches (codecs/_lanes.py) against the scalar ports of ggml's functions
    (codecs/_ggml_math.py), and the SYM4_B64 block code against its one-value-at-a-time reference."""
    from quantcli import codecs
    from quantcli.codecs import _ggml_math as gm
    from quantcli.codecs import _lanes as ln
    from quantcli.codecs.sym4 import reference_quantize

    rng = np.random.default_rng(5)
    n, nl = 16, 2048
    x = (rng.standard_normal((n, nl)) * rng.uniform(1e-3, 10, nl)).astype(np.float32)
    x[:, :8] = 0.0  # all-zero groups
    x[3, 8:64] *= 30  # an outlier per group
    w = (rng.random((n, nl)) + 0.05).astype(np.float32)
    mismatched: dict[str, int] = {}
    for label, args in (("make_qkx3_quants", (3, np.float32(-0.9), np.float32(0.05), 36, False)),
                        ("make_qkx2_quants", (3, np.float32(-0.5), np.float32(0.1), 15, True)),
                        ("make_qkx2_quants/15", (15, np.float32(-1.0), np.float32(0.1), 20, False))):
        nmax, rmin, rdelta, nstep, mad = args
        wt = np.abs(x) if mad else w
        scale, the_min, Lt = np.empty(nl, np.float32), np.empty(nl, np.float32), np.empty((n, nl), np.float32)
        ln.qkx_lanes(x, wt, nl, nmax, rmin, rdelta, nstep, mad, scale, the_min, Lt)
        bad = 0
        for k in range(nl):
            L, laux = np.zeros(n, np.int64), np.zeros(n, np.int64)
            s, m = gm.make_qkx_quants(n, nmax, np.ascontiguousarray(x[:, k]), 0, np.ascontiguousarray(wt[:, k]), 0,
                                      L, 0, laux, rmin, rdelta, nstep, mad)
            bad += not (np.float32(s) == scale[k] and np.float32(m) == the_min[k] and np.array_equal(L, Lt[:, k]))
        mismatched[label] = bad
    scale, Lt = np.empty(nl, np.float32), np.empty((n, nl), np.float32)
    ln.qx_lanes(x, w, nl, 4, scale, Lt)
    bad = 0
    for k in range(nl):
        L = np.zeros(n, np.int64)
        s = gm.make_qx_quants(n, 4, np.ascontiguousarray(x[:, k]), 0, L, 0, np.ascontiguousarray(w[:, k]), 0)
        bad += not (np.float32(s) == scale[k] and np.array_equal(L, Lt[:, k]))
    mismatched["make_qx_quants"] = bad
    scale, Lt = np.empty(nl, np.float32), np.empty((n, nl), np.float32)
    ln.q3_lanes(x, nl, scale, Lt)
    bad = 0
    for k in range(nl):
        L = np.zeros(n, np.int64)
        s = gm.make_q3_quants(np.ascontiguousarray(x[:, k]), 0, L, 0)
        bad += not (np.float32(s) == scale[k] and np.array_equal(L, Lt[:, k]))
    mismatched["make_q3_quants"] = bad
    rows = (rng.standard_normal((16, 333)) * rng.uniform(1e-3, 1e3, (16, 1))).astype(np.float32)
    packed = codecs.quantize(rows, "SYM4_B64")
    mismatched["SYM4_B64"] = sum(reference_quantize(r.tolist())[2] != packed[i].tobytes() for i, r in enumerate(rows))
    ok = not any(mismatched.values())
    groups = 5 * nl
    return ok, mismatched, (f"{groups} groups of 16 through the lane kernels equal the scalar ports "
                            "(make_qkx2/3_quants, make_qx_quants, make_q3_quants: scales, mins, levels), and 16 "
                            "rows of SYM4_B64 equal its scalar reference"
                            + ("" if ok else "; mismatches: " + ", ".join(f"{k} {v}" for k, v in mismatched.items() if v)))


# -- spec/001 on SYM4_B64 ------------------------------------------------------------------------


def _sym4_blocks(row: bytes, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, q) of one SYM4_B64 row, read from its bytes."""
    scales, qs, pos = [], [], 0
    for b0 in range(0, cols, 64):
        m = min(64, cols - b0)
        scales.append(np.frombuffer(row[pos:pos + 4], "<f4")[0])
        nib = np.frombuffer(row[pos + 4:pos + 4 + (m + 1) // 2], np.uint8)
        qs.append((np.stack([nib & 15, nib >> 4], axis=1).reshape(-1).astype(np.float32) - 8)[:m])
        pos += 4 + (m + 1) // 2
    return np.array(scales, np.float32), np.concatenate(qs)


def _rows(seed: int, shape: tuple[int, int]) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[:, ::17] *= 40
    return x


def quant_001() -> Result:
    from quantcli import codecs

    x = _rows(1, (32, 64 * 8))
    data = codecs.quantize(x, "SYM4_B64")
    back = codecs.dequantize(data, "SYM4_B64", x.shape)
    worst, mse_ratio, q_ok = 0.0, 0.0, True
    for r in range(x.shape[0]):
        scale, q = _sym4_blocks(data[r].tobytes(), x.shape[1])
        q_ok &= bool(q.min() >= -7 and q.max() <= 7 and (scale >= 0).all())
        err = np.abs(back[r] - x[r]).reshape(-1, 64).astype(np.float64)
        worst = max(worst, float((err / scale[:, None]).max()))
        mse_ratio = max(mse_ratio, float(((err ** 2).mean(axis=1) / (scale.astype(np.float64) ** 2 / 4)).max()))
    ok = q_ok and worst < 1.0 and mse_ratio <= 1.0
    return ok, {"max_err_over_scale": worst, "max_mse_over_bound": mse_ratio}, (
        f"max |x - x_hat| / scale {worst:.4f} (< 1), max block MSE / (scale^2/4) {mse_ratio:.4f} (<= 1), "
        f"q in [-7, 7]: {q_ok}")


def quant_002() -> Result:
    from quantcli import codecs

    x = np.zeros((2, 64 * 3 + 5), np.float32)
    data = codecs.quantize(x, "SYM4_B64")
    scale, q = _sym4_blocks(data[0].tobytes(), x.shape[1])
    back = codecs.dequantize(data, "SYM4_B64", x.shape)
    ok = not scale.any() and not q.any() and not back.any()
    return ok, int(np.count_nonzero(back)), f"zeros: scales 0, q 0, {np.count_nonzero(back)} non-zero decoded values"


def quant_003() -> Result:
    from quantcli import codecs

    x = _rows(3, (4, 64 * 7))
    whole = codecs.quantize(x, "SYM4_B64").reshape(4, 7, 36)
    same = sum(np.array_equal(whole[:, b], codecs.quantize(x[:, 64 * b:64 * (b + 1)], "SYM4_B64")) for b in range(7))
    return same == 7, same, f"{same} of 7 blocks quantize to the bytes they get alone"


def quant_004() -> Result:
    from quantcli import codecs

    bad = []
    for n in (1, 3, 63, 65, 129, 333):
        x = _rows(4, (2, n))
        data = codecs.quantize(x, "SYM4_B64")
        back = codecs.dequantize(data, "SYM4_B64", x.shape)
        scale, q = _sym4_blocks(data[0].tobytes(), n)
        if data.shape[1] != 4 * -(-n // 64) + (n + 1) // 2 or (n % 2 and data[0, -1] >> 4) \
                or not np.array_equal(back[0], q * np.repeat(scale, 64)[:n]):
            bad.append(n)
    return not bad, bad, "lengths 1, 3, 63, 65, 129, 333 pack into nibble pairs and decode in place" + (
        f"; wrong for {bad}" if bad else "")


def quant_005() -> Result:
    from quantcli import codecs

    x = _rows(5, (8, 4096))
    ratio = x.nbytes / codecs.quantize(x, "SYM4_B64").nbytes
    want = 32 / (4 + 32 / 64)
    return abs(ratio - want) < 1e-9 and ratio > 6, ratio, (
        f"{ratio:.3f}x smaller than float32 = 32 / (4 + 32/64) (the spec's note says ~6x; its formula gives 7.11x)")


CONTRACTS: dict[str, Callable[[], Result]] = {
    "FALSIFY-QO-001": qo_001, "FALSIFY-QO-002": qo_002, "FALSIFY-QO-003": qo_003, "FALSIFY-QO-004": qo_004,
    "FALSIFY-QO-005": qo_005, "FALSIFY-QUANT-001": quant_001, "FALSIFY-QUANT-002": quant_002,
    "FALSIFY-QUANT-003": quant_003, "FALSIFY-QUANT-004": quant_004, "FALSIFY-QUANT-005": quant_005,
}


def run_all() -> list[tuple[str, bool, Any, str]]:
    """(id, ok, figure, detail) of each contract, in ID order; an exception is a failure, not a crash."""
    out = []
    for cid, fn in CONTRACTS.items():
        try:
            ok, figure, detail = fn()
        except Exception as exc:  # a contract that cannot run has failed
            ok, figure, detail = False, None, f"raised {type(exc).__name__}: {exc}"
        out.append((cid, bool(ok), figure, detail))
    return out


class _Shape:
    """A model that is only tensor shapes and the metadata the planner reads: what a plan needs."""

    def __init__(self, arch: str, n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int,
                 head_dim: int, n_vocab: int) -> None:
        from gguf import GGMLQuantizationType as Q

        from quantcli.formats.base import TensorInfo

        def t(name: str, *shape: int) -> TensorInfo:
            n = int(np.prod(shape))
            return TensorInfo(name, tuple(shape), "F32", Q.F32, 4 * n, 0)

        e, q, kv = n_embd, n_head * head_dim, n_head_kv * head_dim
        infos = [t("token_embd.weight", n_vocab, e), t("output.weight", n_vocab, e), t("output_norm.weight", e)]
        for i in range(n_layer):
            b = f"blk.{i}."
            infos += [t(b + "attn_norm.weight", e), t(b + "attn_q.weight", q, e), t(b + "attn_k.weight", kv, e),
                      t(b + "attn_v.weight", kv, e), t(b + "attn_output.weight", e, q),
                      t(b + "attn_q_norm.weight", head_dim), t(b + "attn_k_norm.weight", head_dim),
                      t(b + "ffn_norm.weight", e), t(b + "ffn_gate.weight", n_ff, e), t(b + "ffn_up.weight", n_ff, e),
                      t(b + "ffn_down.weight", e, n_ff)]
        self.path = Path(f"{arch}-{n_layer}x{n_embd}")
        self.tensors = {i.name: i for i in infos}
        self._kv = {"general.architecture": arch, f"{arch}.block_count": n_layer,
                    f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_head_kv}

    def meta(self, key: str, default: Any = None) -> Any:
        return self._kv.get(key, default)
