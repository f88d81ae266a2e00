"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights by an exact transform.

For an input X shared by linears W_1..W_n (X @ W_k.T), per input channel j

    s_j = max|X_j|^a / max_k max_i |W_k[i, j]|^(1-a)          # a: the migration strength alpha

and X·diag(s)^-1 is folded into what makes X (the RMSNorm weight before it, or the rows and bias
of the linear that outputs it), diag(s)·W_k into every W_k's columns: the product is unchanged, the
activations' channels are flatter (easier int8 per-tensor / per-token), the weights a little less
so (int8 per output channel copes). s is clamped to >= 1e-5; a channel whose activation or weight
maximum is 0 (or not finite) keeps s = 1.

Mappings (MAPPINGS, per architecture): attn_norm -> attn_q/k/v and ffn_norm -> ffn_gate/ffn_up
(Gemma 3's pre-feed-forward norm is `ffn_norm`; `post_attention_norm` normalises the attention
*output* and feeds nothing); with mappings="all" also attn_v -> attn_output and ffn_up -> ffn_down.
attn_v -> attn_output goes through attention: output channel (q head h, d) is a softmax-weighted
sum of v channel (h // group, d), so one scale per v channel serves every q head of its group (its
activation and weight maxima are taken over the group's attn_output columns). ffn_up -> ffn_down
goes through act(gate) * up, which is linear in up.

    obs = SmoothObserver(alpha="auto", mappings="all")          # or make_observer("smooth", ...)
    run_calibration(model, tokens, RunOptions(ctx=512, chunks=128), [obs])
    result = obs.result()                                          # SmoothResult: per layer a, s, maxima
    for name, w in smoothed_tensors(reader, result): ...           # the smoothed model, tensor by tensor
    Model(SmoothedReader(reader, result))                          # ... or as a reader, to evaluate it

alpha="auto" searches the grid 0, 0.05, ..., 1, and last NaN, "left as it is" (scales 1, which
no alpha gives: alpha 0 is 1 / max|W_j|), for what the int8 engine will do:

- W8A8 (a float output; static per-tensor or per-token activations, `activations`): the smallest
  error of the whole block run as W8A8 (every linear, attention, norms) on `search_chunks`
  chunks, mean over tokens of ||h_W8A8 - h||^2 / ||h||^2 of the block's output h (each token
  relative to itself, as the next RMSNorm sees it), static: with the static scales each choice
  would get. First one alpha for the whole layer (the grid's curve, "block"), then each
  mapping's own alpha in table order, the grid searched with the others held (one pass of
  coordinate descent from the layer's optimum; curves "block:<mapping>"; an alpha moves only
  where the block error drops); the pass costs 4x the layer's alpha curve. The mappings' errors
  interact through the block (q/k/v's error reaches attn_output's input, and attention's softmax
  and the next norm weigh what each linear's error does), so each linear's own error,
  ||dq(q(X/s)) @ dq(q(W·s)).T - X @ W.T||^2 / ||X @ W.T||^2, cannot choose them; statically it
  also favours alpha -> 1 (it flattens the maxima that set the one scale, whatever that costs
  downstream). On Gemma 3 270M (Exodus, ctx 512, calibrated on Genesis; F32 9.2035 on 8 chunks,
  11.1271 on all 79), static: per-linear errors 11.78 on 8 chunks, one alpha per layer by the
  block 9.6025 / 11.6441, each mapping's own 9.5363 / 11.5228. Per token, each mapping's alpha
  by its own linears' errors (on 2048 rows of all chunks) gave 9.2940 / 11.2634, and on two
  texts nothing was tuned on (Debian's license texts, Vim's user manual; 40 chunks each) 13.3435
  and 15.8684 (F32 13.1245, 15.5250); the block search on one chunk 9.2732 / 11.2751, 13.3174,
  15.7355; on SEARCH_CHUNKS_W8A8 = 4 chunks (the default; llama.cpp's kernels search one)
  9.2913 / 11.2537, 13.3033, 15.7041, and smoothing all 96 chunks of Genesis took 1089 s of one
  core against 501 s. Static, 4 chunks against 1: 11.5064 / 11.5071 on Exodus, 14.8751 / 15.0505
  and 17.4984 / 17.6627 on the two other texts (static int8 is far from F32 on those, whatever
  the search), 1162 s against 796 s. With "left as it is" in the grid, per token leaves ffn_down
  of layers 0 and 5 and attn_v -> attn_output of layer 12 as they are (9.2921 / 11.2464,
  13.2917, 15.7185); static only layer 17's attn_v -> attn_output (9.5522 / 11.5074, 14.8795,
  17.4955).

- llama.cpp's CPU kernels (`weight_types`: the GGUF's planned type of each block linear, given
  when the output is a quantized GGUF): one alpha per layer, or the layer left as it is (NaN, the
  last candidate), by the same block error on `search_chunks` chunks with each linear's weight in
  its GGML type (decoded) and its input rounded to the type's vec_dot_type, as ggml-cpu computes
  Q8_0 x Q8_0 (or Q4_K x Q8_K ...). Q8_0 blocks of 32 absorb much of what smoothing moves, so a
  layer it does not help keeps its weights; on Gemma 3 270M (Q8_0, Exodus) llama-perplexity
  measured 9.2151 against 9.2202 for plain Q8_0 and 9.2265 for the W8A8 objective.

Static per-tensor scales (`static_scales`): "mse" (static's default) takes for each matmul input the
max|x| (scale * 127) among max * 0.05^(k/30), k = 0..30, that minimises sum((dq(q(x)) - x)^2) over
the sampled rows — llm-compressor's `mse` observer: it clips the rare massive activations (BOS,
super-weight channels) that would otherwise leave typical tokens a few int8 steps; "max" takes
the calibration maximum.

`activations="hybrid"` simulates static per-tensor scales on every linear but ffn_down, whose
input is quantized per token (engine/w8a8.py says why: ffn_down's input channels are the MLP's
neurons, and which fire depends on the text). Its static scales default to "max"
(default_static_scales): the MSE clip pays where an input's tails are long, ffn_down's, which
hybrid quantizes per token; on the norm outputs and attn_output it clips what other text drives
further. On Gemma 3 270M calibrated on Genesis, hybrid searched with "max" against "mse" (F32
in brackets): Exodus 8 chunks 9.3056 / 9.3186 (9.2035), 79 chunks 11.2840 / 11.3088 (11.1271),
40 chunks of the license texts 13.3340 / 13.4954 (13.1245), Vim's manual 15.6805 / 15.9605
(15.5250), perldiag.pod 19.4403 / 19.7393 (19.2260), Python's pydoc topics 12.2043 / 12.3674
(11.9995), and the search took 787 s of one core against 1383 s.

A channel the calibration saw quiet: SmoothQuant divides channel j by s_j, which grows with
max|X_j|, so a channel that was small on the calibration text is amplified, at alpha 1 to the
same level as the loudest. On text unlike the calibration text such a channel can fire far
beyond its calibration maximum (ffn_down's inputs on Gemma 3 270M: 7-32x, smoothed on Genesis,
on the licenses and Vim's manual), and its amplified value sets a per-token scale or clips
under a static one. `channel_floor` q raises each max|X_j| to at least the q-quantile of the
input's channel maxima before s is computed, so no channel is amplified beyond that quantile's;
the transform stays exact (any s > 0 is). `--alpha auto`'s per-token W8A8 search uses
CHANNEL_FLOOR unless told otherwise (0 turns it off); static and hybrid activations, a given
alpha and the search for llama.cpp's kernels (whose Q8_0/Q8_K blocks give each 32 (256)
channels of a token their own scale) keep SmoothQuant's formula as it is. The search cannot
choose the floor (the calibration text rewards amplifying what it saw), so it is a prior, set
on Gemma 3 270M calibrated on Genesis (F32: Exodus 8 chunks 9.2035, 79 chunks 11.1271; 40 chunks
of the license texts 13.1245, Vim's manual 15.5250, perldiag.pod 19.2260, Python's pydoc topics
11.9995). Per token, q 0.75 moved them 9.2921 -> 9.2528, 11.2464 -> 11.2656, 13.2917 ->
13.2542, 15.7185 -> 15.6150, 19.4180 -> 19.3661 and 12.1755 -> 12.1208 (pydoc was scored
only after the default was set); q 0.5 and 0.9 (on auto's alphas, not searched) did less on the
licenses. Hybrid it lost on five of the six with MSE-clipped static scales (pydoc 12.3674 ->
12.4908, Vim 15.9605 -> 16.0761) and on four with hybrid's maxima (Exodus 8 chunks 9.3056 ->
9.3427, Vim 15.6805 -> 15.7258), static on three (Vim 17.4955 -> 17.7135).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
from gguf import GGMLQuantizationType

from quantcli.calibrate.absmax import fold_max
from quantcli.calibrate.runner import Observer, Probe, RunOptions, run_calibration
from quantcli.engine.model import LINEARS, Model
from quantcli.engine.ops import activation_type
from quantcli.engine.w8a8 import MODES, W8A8, fake_quant_activations, fake_quant_weight, mode_of
from quantcli.errors import InputError, UsageError
from quantcli.formats.base import ModelReader
from quantcli.progress import ProgressFn

S_MIN = 1e-5  # smallest scale (SmoothQuant's clamp)
CLIP_RATIOS = np.float32(0.05) ** (np.arange(31, dtype=np.float32) / np.float32(30))  # static clip candidates
STATIC_SCALES = ("mse", "max")
SEARCH_ROWS = 512  # rows of each input the static clips of the block search are chosen on
# chunks the W8A8 search runs by default (llama.cpp's kernels: 1); see the module docstring
SEARCH_CHUNKS_W8A8 = 4
# `--alpha auto`'s per-token W8A8 search floors each channel's max|X_j| at this quantile of its
# input's channel maxima before s is computed (see the module docstring, "A channel the calibration
# saw quiet")
CHANNEL_FLOOR = 0.75


@dataclass(frozen=True)
class Mapping:
    """X, made by `source`, read by `consumers`: X / s folds into source, s into consumers' columns."""

    name: str
    source: str  # short name: a norm (weight / s) or a linear (rows / s, bias / s)
    consumers: tuple[str, ...]  # linears reading X; the first one's input is what is measured
    optional: bool = False  # only with mappings="all"
    heads: bool = False  # attn_v -> attn_output: one scale per v channel, shared by its q-head group


_NORM_MAPPINGS = (
    Mapping("attn_norm->qkv", "attn_norm", ("attn_q", "attn_k", "attn_v")),
    Mapping("ffn_norm->gate_up", "ffn_norm", ("ffn_gate", "ffn_up")),  # gemma3: the pre-ffw norm
    Mapping("attn_v->attn_output", "attn_v", ("attn_output",), optional=True, heads=True),
    Mapping("ffn_up->ffn_down", "ffn_up", ("ffn_down",), optional=True),
)
# the same short names in all four: llama.cpp's GGUF names the pre-attention and pre-feed-forward
# norms attn_norm and ffn_norm everywhere (gemma3's post norms are on the branch outputs)
MAPPINGS: dict[str, tuple[Mapping, ...]] = {arch: _NORM_MAPPINGS for arch in ("llama", "qwen2", "qwen3", "gemma3")}
MAPPING_SETS = ("norm", "all")


def mappings_for(arch: str, which: str = "norm") -> tuple[Mapping, ...]:
    if which not in MAPPING_SETS:
        raise UsageError(f"unknown mappings '{which}'; known: {', '.join(MAPPING_SETS)}")
    if arch not in MAPPINGS:
        raise InputError(f"SmoothQuant knows no norm -> linear mappings for architecture '{arch}'; "
                         f"known: {', '.join(sorted(MAPPINGS))}")
    return tuple(m for m in MAPPINGS[arch] if which == "all" or not m.optional)


def default_static_scales(activations: str) -> str:
    """The static scales an activation mode (engine.w8a8.MODES) gets unless told: "max" for hybrid,
    "mse" for static (and per token, which has none; see the module docstring)."""
    return "max" if activations == "hybrid" else "mse"


def check_alpha(alpha: Any) -> float | str:
    """alpha as a float in [0, 1], or "auto"; anything else is a usage error."""
    if alpha == "auto":
        return "auto"
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = float("nan")
    if isinstance(alpha, bool) or not 0.0 <= a <= 1.0:
        raise UsageError(f"alpha {alpha!r} is outside [0, 1]; use a migration strength in [0, 1] or 'auto'")
    return a


def check_channel_floor(q: float, what: str = "the channel floor") -> float:
    """A channel floor (a quantile) in [0, 1]; anything else is a usage error naming `what`."""
    if not 0.0 <= q <= 1.0:
        raise UsageError(f"{what} is a quantile in [0, 1], got {q}")
    return float(q)


def smooth_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float, floor: float = 0.0) -> np.ndarray:
    """s_j = max|X_j|^a / max|W_j|^(1-a), clamped to >= 1e-5; 1 where either maximum is 0 or the
    result is not finite. act_max, weight_max [n] -> float32 [n]. With floor q in (0, 1], max|X_j|
    is first raised to at least the q-quantile of the input's (positive, finite) channel maxima:
    a channel the calibration saw quiet is not amplified beyond that quantile's (CHANNEL_FLOOR)."""
    x = np.asarray(act_max, np.float64)
    w = np.asarray(weight_max, np.float64)
    if floor > 0:
        seen = x[(x > 0) & np.isfinite(x)]
        if seen.size:
            x = np.where(x > 0, np.maximum(x, np.quantile(seen, floor)), x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(x, alpha) / np.power(w, 1.0 - alpha)
    ok = (x > 0) & (w > 0) & np.isfinite(s)
    return np.where(ok, np.maximum(s, S_MIN), 1.0).astype(np.float32)


def _group(cfg: Any) -> int:
    return cfg.n_head // cfg.n_head_kv


def expand(m: Mapping, s: np.ndarray, cfg: Any) -> np.ndarray:
    """A mapping's scales [n] over its consumers' input channels: for attn_v -> attn_output each v
    channel's scale repeated for the q heads of its group ([n_head_kv * dv] -> [n_head * dv])."""
    if not m.heads:
        return s
    return np.repeat(s.reshape(cfg.n_head_kv, 1, cfg.head_dim_v), _group(cfg), axis=1).reshape(-1)


def _per_source_channel(m: Mapping, v: np.ndarray, cfg: Any) -> np.ndarray:
    """Per consumer input channel [n_in] -> per scale [n]: the max over each v channel's q heads."""
    if not m.heads:
        return v
    return v.reshape(cfg.n_head_kv, _group(cfg), cfg.head_dim_v).max(axis=1).reshape(-1)


def fold(short: str, arr: np.ndarray, scales: dict[str, np.ndarray], mappings: tuple[Mapping, ...],
         cfg: Any) -> np.ndarray:
    """Tensor `short` (a layer's 'attn_norm', 'attn_v', 'attn_v.bias', ...) with the layer's scales
    folded in: X / s into the source (norm weight, linear rows and bias), s into consumers'
    columns. The mappings go in table order, so every caller computes the same float32 values."""
    out = arr
    for m in mappings:
        s = scales.get(m.name)
        if s is None:
            continue
        if short == m.source or short == m.source + ".bias":
            out = out / (s[:, None] if out.ndim == 2 else s)
        elif short in m.consumers:
            out = out * expand(m, s, cfg)[None, :]
    return out


def _same(a: float, b: float) -> bool:
    """Whether two alphas are the same choice (NaN, left as it is, is itself)."""
    return a == b or (np.isnan(a) and np.isnan(b))


def _layer_alpha(alphas: list[float]) -> float:
    """A layer's one alpha from its mappings': the common value, or the mean of those that
    smooth where they differ; NaN where every mapping is left as it is."""
    moved = [a for a in alphas if not np.isnan(a)]
    if not moved:
        return float("nan")
    return moved[0] if len(set(moved)) == 1 else float(np.mean(moved))


def _mean_relative_error(outs: list[np.ndarray], refs: list[np.ndarray]) -> float:
    """Mean over tokens (rows of every chunk) of ||out - ref||^2 / ||ref||^2 (rows with ref 0 skipped)."""
    total, n = 0.0, 0
    for out, ref in zip(outs, refs):
        d = out - ref
        num = np.einsum("ij,ij->i", d, d, dtype=np.float64)
        den = np.einsum("ij,ij->i", ref, ref, dtype=np.float64)
        ok = den > 0
        total += float((num[ok] / den[ok]).sum())
        n += int(ok.sum())
    return total / max(n, 1)


def fold_layer(weights: dict[str, np.ndarray], scales: dict[str, np.ndarray], mappings: tuple[Mapping, ...],
               cfg: Any) -> None:
    """Fold a layer's scales into its float32 weights (by short name), in place."""
    for short in list(weights):
        folded = fold(short, weights[short], scales, mappings, cfg)
        if folded is not weights[short]:
            weights[short][...] = folded


@dataclass
class LayerInputs:
    """What smoothing measures of a layer's inputs before deciding (SmoothObserver.gather): per
    block input (probe_inputs' keys) the per-channel max|x| and the rows at the sampled positions,
    and the inputs of the chunks `--alpha auto`'s block search runs on."""

    act_max: dict[str, np.ndarray]
    sample: dict[str, np.ndarray]
    heads: list[np.ndarray]  # [ctx, n_embd] per searched chunk, in chunk order

    @classmethod
    def merge(cls, parts: list["LayerInputs"]) -> "LayerInputs":
        """Shards of the chunks, in chunk order, as one run's: the maxima are exact in any order,
        the rows and chunk inputs join in chunk order, so any split gives the same arrays."""
        act_max: dict[str, np.ndarray] = {}
        for p in parts:
            for k, v in p.act_max.items():
                act_max[k] = np.maximum(act_max[k], v) if k in act_max else v
        sample = {k: np.concatenate([p.sample[k] for p in parts]) for k in parts[0].sample}
        return cls(act_max, sample, [x for p in parts for x in p.heads])


@dataclass
class LayerSmoothing:
    """What smoothing did to one layer (the checkpointed state; all arrays float32)."""

    alpha: float
    scales: dict[str, np.ndarray]  # mapping -> s [n] (attn_v->attn_output: per v channel)
    act_max: dict[str, np.ndarray]  # measured input -> max|X_j| before smoothing, every input channel
    error_before: dict[str, float]  # smoothed linear -> simulated W8A8 relative error unsmoothed
    error_after: dict[str, float]  # ... and smoothed with `alpha`
    alpha_errors: dict[str, np.ndarray] = field(default_factory=dict)  # auto: the whole block's error
    #   at each grid alpha, under "block" (one alpha for all) and, for W8A8, "block:<mapping>"
    #   (that mapping's alpha, the others held)
    weight_max: dict[str, np.ndarray] = field(default_factory=dict)  # mapping -> max_k max_i |W_k[i, j]| before
    alphas: dict[str, float] = field(default_factory=dict)  # mapping -> its alpha (`alpha` is their mean when they differ)
    static_max: dict[str, float] = field(default_factory=dict)  # input -> the static scale's max|x|, smoothed

    def alpha_of(self, m: Mapping) -> float:
        return self.alphas.get(m.name, self.alpha)

    def weight_max_after(self, m: Mapping) -> np.ndarray:
        """max |W[i, j] * s_j| over mapping m's consumers, per scale channel, after smoothing."""
        return self.weight_max[m.name] * self.scales[m.name]

    def channel_max(self, m: Mapping, cfg: Any) -> np.ndarray:
        """max|X_j| of mapping m's input per scale channel, before smoothing (for attn_v ->
        attn_output: per v channel, the max over its group's q heads)."""
        return _per_source_channel(m, self.act_max[m.consumers[0]], cfg)

    def act_max_after(self, m: Mapping, cfg: Any) -> np.ndarray:
        """max|X_j / s_j| of mapping m's input channels after smoothing."""
        return self.act_max[m.consumers[0]] / expand(m, self.scales[m.name], cfg)

    def outlier_ratio(self, m: Mapping, cfg: Any, after: bool = False) -> float:
        """max / median of the per-channel maxima of m's input (before or after smoothing)."""
        v = self.act_max_after(m, cfg) if after else self.act_max[m.consumers[0]]
        med = float(np.median(v))
        return float(v.max()) / med if med > 0 else float("inf")


@dataclass
class SmoothResult:
    arch: str
    mappings: tuple[Mapping, ...]
    config: Any  # the model's ModelConfig (heads, dims)
    alpha: float | str  # as asked: a number or "auto"
    layers: dict[int, LayerSmoothing] = field(default_factory=dict)
    channel_floor: float = 0.0  # the quantile each channel's max|X_j| was floored at for s (0: none)
    static_scales: str = "mse"  # how the static scales (layers' static_max) were chosen: "mse" or "max"

    def fold(self, name: str, arr: np.ndarray) -> np.ndarray:
        """Tensor `name` (full GGUF name) of the model with the scales folded in (others unchanged)."""
        parts = name.split(".")
        if parts[0] != "blk" or len(parts) < 3 or int(parts[1]) not in self.layers:
            return arr
        short = parts[2] + (".bias" if parts[-1] == "bias" else "")
        return fold(short, arr, self.layers[int(parts[1])].scales, self.mappings, self.config)

    def touched(self, name: str) -> bool:
        """Whether smoothing changes tensor `name`."""
        parts = name.split(".")
        if parts[0] != "blk" or len(parts) < 3 or int(parts[1]) not in self.layers:
            return False
        short = parts[2] + (".bias" if parts[-1] == "bias" else "")
        return any(short in (m.source, m.source + ".bias") or short in m.consumers for m in self.mappings)

    def static_max(self) -> dict[str, float]:
        """The max|x| each linear's static per-tensor activation scale is made of (scale = max / 127;
        weight name -> float): the MSE-chosen clip of its input (or the maximum, static_scales="max")."""
        return {f"blk.{il}.{short}.weight": v for il, layer in self.layers.items()
                for measured, v in layer.static_max.items() for short in _SHARING[measured]}

    def act_max(self) -> dict[str, float]:
        """max|x| of every matmul input of the smoothed model on the calibration text (weight name
        -> float)."""
        out: dict[str, float] = {}
        by_input = {m.consumers[0]: m for m in self.mappings}
        for il, layer in self.layers.items():
            for measured, v in layer.act_max.items():
                m = by_input.get(measured)
                after = layer.act_max_after(m, self.config) if m is not None else v
                for short in _SHARING[measured]:
                    out[f"blk.{il}.{short}.weight"] = float(after.max())
        return out


# the block's four distinct matmul inputs, by the first linear that reads each, and who shares it
_SHARING = {"attn_q": ("attn_q", "attn_k", "attn_v"), "attn_output": ("attn_output",),
            "ffn_gate": ("ffn_gate", "ffn_up"), "ffn_down": ("ffn_down",)}


def sample_rows(chunks: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """At most max_rows positions evenly spaced over all tokens of the chunks [n, ctx], as the
    positions in each chunk (BOS rows included)."""
    n, ctx = chunks.shape
    rows = np.unique(np.linspace(0, n * ctx - 1, min(max_rows, n * ctx)).round().astype(np.int64))
    return [rows[(rows >= c * ctx) & (rows < (c + 1) * ctx)] - c * ctx for c in range(n)]


def probe_inputs(il: int, probe: Probe, rows: list[np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass of the chunks through layer il: per-channel max|x| of each of the block's four
    inputs (by the first linear reading it: attn_q, attn_output, ffn_gate, ffn_down) and their rows
    at the sampled positions `rows` (per chunk)."""
    act_max: dict[str, np.ndarray] = {}  # by full weight name while probing
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _SHARING}
    seen: dict[str, int] = {}
    prefix = f"blk.{il}."

    def hook(name: str, x: np.ndarray) -> None:
        short = name[len(prefix):-len(".weight")]
        if short not in _SHARING:
            return
        fold_max(act_max, name, x)
        c = seen.get(short, 0)
        seen[short] = c + 1
        parts[short].append(np.array(x[rows[c]], np.float32))

    probe(hook, None)
    return ({name[len(prefix):-len(".weight")]: v for name, v in act_max.items()},
            {k: np.concatenate(v) for k, v in parts.items()})


def mse_clip(x: np.ndarray, amax: float) -> float:
    """The static per-tensor max|x| (the int8 scale times 127) among amax * CLIP_RATIOS that
    minimises sum((dq(q(x)) - x)^2) over the rows x (the first such candidate on ties)."""
    if not amax > 0 or x.size == 0:
        return float(amax)
    best, best_c = None, float(amax)
    for r in CLIP_RATIOS:
        c = float(np.float32(amax) * r)
        d = fake_quant_activations(x, "tensor", c) - x
        e = float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        if best is None or e < best:
            best, best_c = e, c
    return best_c


def static_maxima(act_max: dict[str, np.ndarray], sample: dict[str, np.ndarray], kind: str,
                  divisors: dict[str, np.ndarray | float] | None = None, rows: int | None = None) -> dict[str, float]:
    """Per block input (probe_inputs' keys): the max|x| its static per-tensor scale is made of,
    the input divided by `divisors` (smoothing; None: as it is): the maximum (kind "max") or the
    MSE clip (kind "mse") on its sampled rows, at most `rows` of them evenly spaced."""
    out = {}
    for inp, v in act_max.items():
        div = 1.0 if divisors is None else divisors[inp]
        amax = float((v / div).max())
        if kind == "mse":
            x = sample[inp]
            if rows is not None:
                x = x[np.linspace(0, len(x) - 1, min(rows, len(x))).astype(int)]
            amax = mse_clip(x / div, amax)
        out[inp] = amax
    return out


class SmoothObserver(Observer, name="smooth"):
    """Per layer: probe the per-channel input maxima and a sample of rows, choose alpha and s,
    choose the static scales, fold s into the layer's weights before it runs. The runner's hidden
    states after the layer are those of the smoothed model, equal to the unsmoothed one's up to
    float32 rounding."""

    def __init__(self, alpha: float | str = 0.5, mappings: str = "norm", grid: float = 0.05,
                 activations: str = "tensor", max_rows: int = 2048, static_scales: str | None = None,
                 search_chunks: int | None = None, weight_types: dict[str, str] | None = None,
                 channel_floor: float | None = None) -> None:
        alpha = check_alpha(alpha)
        if search_chunks is None:
            search_chunks = 1 if weight_types else SEARCH_CHUNKS_W8A8
        if channel_floor is None:  # the per-token search's floor; a given alpha is SmoothQuant's formula as it is
            channel_floor = CHANNEL_FLOOR if alpha == "auto" and not weight_types and activations == "token" else 0.0
        channel_floor = check_channel_floor(channel_floor)
        if static_scales is None:
            static_scales = default_static_scales(activations)
        if mappings not in MAPPING_SETS:
            raise UsageError(f"unknown mappings '{mappings}'; known: {', '.join(MAPPING_SETS)}")
        if not 0.0 < grid <= 1.0:
            raise UsageError(f"alpha grid step {grid} must be in (0, 1]")
        if activations not in MODES:
            raise UsageError(f"unknown activation mode '{activations}'; known: {', '.join(MODES)}")
        if max_rows < 1 or search_chunks < 1:
            raise UsageError(f"max_rows and search_chunks must be at least 1, got {max_rows}, {search_chunks}")
        if static_scales not in STATIC_SCALES:
            raise UsageError(f"unknown static scales '{static_scales}'; known: {', '.join(STATIC_SCALES)}")
        weight_types = dict(sorted(weight_types.items())) if weight_types else None
        super().__init__(alpha=alpha, mappings=mappings, grid=grid, activations=activations, max_rows=max_rows,
                         static_scales=static_scales, search_chunks=search_chunks, weight_types=weight_types,
                         channel_floor=channel_floor)
        self.alpha = alpha  # SmoothQuant migration strength, or "auto": searched (see the module docstring)
        self.mappings = mappings  # "norm": norm -> linears; "all": also attn_v -> attn_output, ffn_up -> ffn_down
        self.grid = grid  # step of the auto search's alpha grid over [0, 1]
        self.activations = activations  # W8A8 activation mode the errors are simulated with
        self.max_rows = max_rows  # rows of each input the errors and static clips are measured on
        self.static_scales = static_scales  # "mse": clipped static scales; "max": the calibration maxima
        self.search_chunks = search_chunks  # chunks the auto search's block errors run (the first ones)
        # the GGUF's planned type of each block linear (weight name -> GGML type): `--alpha auto`
        # then searches for llama.cpp's CPU kernels (see _ggml_block_error), "left as it is" included
        self.weight_types = weight_types
        self.channel_floor = channel_floor  # quantile each channel's max|X_j| is raised to (0: none)
        self.result_: SmoothResult | None = None

    def begin(self, model: Model, chunks: np.ndarray) -> None:
        cfg = model.config
        self.model_ = model
        self.result_ = SmoothResult(cfg.arch, mappings_for(cfg.arch, self.mappings), cfg, self.alpha,
                                    channel_floor=self.channel_floor, static_scales=self.static_scales)
        self.rows_ = sample_rows(chunks, self.max_rows)  # sampled positions per chunk

    # -- the layer --------------------------------------------------------------------------------
    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Probe) -> None:
        self.decide(il, weights, self.gather(il, probe))

    def gather(self, il: int, probe: Probe, first: int = 0) -> LayerInputs:
        """What layer il's decision needs of its inputs, from the chunks `probe` runs: chunks first,
        first + 1, ... of the run (a shard of them on a cluster; LayerInputs.merge joins shards)."""
        rows = self.rows_[first:first + probe.n_chunks]
        act_max, sample = probe_inputs(il, probe, rows)
        searched = self.alpha == "auto"
        heads = [probe.input(c) for c in range(probe.n_chunks) if searched and first + c < self.search_chunks]
        return LayerInputs(act_max, sample, heads)

    def alpha_grid(self) -> np.ndarray:
        """The alphas `--alpha auto` tries: 0, grid, 2 grid, ..., 1, then NaN, left as it is
        (scales 1; no alpha gives those), last, so that a tie keeps the smoothing."""
        return np.append(np.round(np.arange(0.0, 1.0 + 1e-9, self.grid), 6), np.nan)

    def _maxima(self, weights: dict[str, np.ndarray], inputs: LayerInputs) -> tuple[dict, dict]:
        """Per mapping, per scale channel: max|X_j| of its input and max|W_j| over its consumers."""
        res = self.result_
        cfg = res.config
        w_max = {m.name: _per_source_channel(m, np.max([np.abs(weights[c]).max(axis=0) for c in m.consumers],
                                                      axis=0), cfg) for m in res.mappings}
        a_max = {m.name: _per_source_channel(m, inputs.act_max[m.consumers[0]], cfg) for m in res.mappings}
        return a_max, w_max

    def _scales(self, a_max: dict, w_max: dict, alphas: dict[str, float]) -> dict[str, np.ndarray]:
        """Per mapping its scales at its alpha (with the channel floor); ones (nothing moved) where
        the alpha is NaN."""
        return {name: (np.ones_like(a_max[name], dtype=np.float32) if np.isnan(alphas[name])
                       else smooth_scales(a_max[name], w_max[name], alphas[name], self.channel_floor))
                for name in a_max}

    def _refs(self, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """X @ W.T of every smoothed linear on the sampled rows."""
        return {c: sample[m.consumers[0]] @ weights[c].T for m in self.result_.mappings for c in m.consumers}

    def curves(self, il: int, weights: dict[str, np.ndarray], inputs: LayerInputs,
               alphas: np.ndarray) -> dict[str, np.ndarray]:
        """`--alpha auto`'s first curve, "block": the whole block's error at each of these alphas
        for every mapping (float32 [len(alphas)]), simulated W8A8 or llama.cpp's kernels (NaN:
        the layer left as it is). Each alpha's error is computed alone, so any split of the grid
        (shards of a cluster) joins to the same curve."""
        a_max, w_max = self._maxima(weights, inputs)
        names = list(a_max)
        error = self._ggml_block_error if self.weight_types is not None else self._block_error
        block_refs = [self.model_.layer(il, weights, x) for x in inputs.heads]
        return {"block": np.array([error(il, weights, inputs, block_refs,
                                         self._scales(a_max, w_max, dict.fromkeys(names, a)))
                                   for a in alphas], np.float32)}

    def _per_mapping(self, il: int, weights: dict[str, np.ndarray], inputs: LayerInputs, a_max: dict, w_max: dict,
                     alphas: dict[str, float], curves: dict[str, np.ndarray]) -> dict[str, float]:
        """The W8A8 search's second step: from the layer's one alpha, each mapping's alpha in
        table order searched over the grid with the others held, by the block error; it moves to
        the first minimum only where that is below the error so far. Adds each mapping's curve to
        `curves` as "block:<mapping>"; returns the alphas. a_max, w_max: _maxima(weights, inputs)."""
        refs = [self.model_.layer(il, weights, x) for x in inputs.heads]
        grid = self.alpha_grid()
        alphas = dict(alphas)

        def error(a: dict[str, float]) -> float:
            return self._block_error(il, weights, inputs, refs, self._scales(a_max, w_max, a))

        best = error(alphas)
        for m in self.result_.mappings:
            errs = np.array([best if _same(float(a), alphas[m.name]) else error({**alphas, m.name: float(a)})
                             for a in grid])
            k = int(np.argmin(errs))
            if errs[k] < best:
                alphas[m.name], best = float(grid[k]), float(errs[k])
            curves[f"block:{m.name}"] = errs.astype(np.float32)
        return alphas

    def _per_mapping_search(self) -> bool:
        """Whether `--alpha auto` goes on to each mapping's own alpha: for simulated W8A8 (a float
        output), not for llama.cpp's kernels (one alpha per layer, or the layer as it is)."""
        return self.weight_types is None

    def decide(self, il: int, weights: dict[str, np.ndarray], inputs: LayerInputs,
               curves: dict[str, np.ndarray] | None = None) -> LayerSmoothing:
        """Choose layer il's alpha, scales and static scales from its inputs, record them, and fold
        the scales into `weights` (in place). `curves`: the auto search's errors over the whole
        grid when already computed (`curves()`, on a cluster's shards)."""
        res = self.result_
        assert res is not None, "begin() first"
        cfg = res.config
        act_max, sample = inputs.act_max, inputs.sample
        a_max, w_max = self._maxima(weights, inputs)
        names = list(a_max)
        refs = self._refs(weights, sample)
        grid = self.alpha_grid()
        if self.alpha != "auto":
            curves, alphas = {}, dict.fromkeys(names, float(self.alpha))
        else:
            if curves is None:
                curves = self.curves(il, weights, inputs, grid)
            # the first minimum (for llama.cpp's kernels "as it is", NaN, is last)
            alphas = dict.fromkeys(names, float(grid[int(np.argmin(curves["block"]))]))
            if self._per_mapping_search():  # then each mapping's own alpha
                curves = dict(curves)
                alphas = self._per_mapping(il, weights, inputs, a_max, w_max, alphas, curves)
        s = self._scales(a_max, w_max, alphas)
        ones = {name: np.ones_like(v) for name, v in a_max.items()}
        before = self._errors(weights, sample, refs, ones, self._static(act_max, sample, ones))
        static = self._static(act_max, sample, s)
        after = self._errors(weights, sample, refs, s, static)
        fold_layer(weights, s, res.mappings, cfg)
        layer_alpha = _layer_alpha(list(alphas.values()))
        layer = LayerSmoothing(layer_alpha, s, act_max, before, after,
                               curves, {k: v.astype(np.float32) for k, v in w_max.items()}, alphas, static or {})
        res.layers[il] = layer
        return layer

    def _inputs_scale(self, s: dict[str, np.ndarray]) -> dict[str, np.ndarray | float]:
        """Per block input (_SHARING key): what smoothing divides it by (1 where nothing maps it)."""
        res = self.result_
        by_input = {m.consumers[0]: m for m in res.mappings}
        return {inp: (expand(by_input[inp], s[by_input[inp].name], res.config) if inp in by_input else 1.0)
                for inp in _SHARING}

    def _static(self, act_max: dict[str, np.ndarray], sample: dict[str, np.ndarray], s: dict[str, np.ndarray],
                rows: int | None = None) -> dict[str, float] | None:
        """Per block input: its static scale's max|x| after smoothing by s (None for per-token
        activations); see static_maxima."""
        if self.activations == "token":
            return None
        return static_maxima(act_max, sample, self.static_scales, self._inputs_scale(s), rows)

    def _errors(self, weights: dict[str, np.ndarray], sample: dict[str, np.ndarray], refs: dict[str, np.ndarray],
                scales: dict[str, np.ndarray], static: dict[str, float] | None) -> dict[str, float]:
        """Simulated W8A8 relative error of each consumer, its input X / s and weight W·s:
        ||dq(q(X')) @ dq(q(W')).T - X @ W.T||^2 / ||X @ W.T||^2 on the sampled rows (static: with
        the scales' max|x| in `static`)."""
        res = self.result_
        out: dict[str, float] = {}
        for m in res.mappings:
            s = expand(m, scales[m.name], res.config)
            inp = m.consumers[0]
            xq = fake_quant_activations(sample[inp] / s, mode_of(self.activations, inp),
                                        None if static is None else static[inp])
            for c in m.consumers:
                ref = refs[c]  # x @ W.T
                diff = xq @ fake_quant_weight(weights[c] * s[None, :]).T - ref
                den = float(np.einsum("ij,ij->", ref, ref, dtype=np.float64))
                out[c] = float(np.einsum("ij,ij->", diff, diff, dtype=np.float64)) / den if den > 0 else 0.0
        return out

    def _block_error(self, il: int, weights: dict[str, np.ndarray], inputs: LayerInputs,
                     refs: list[np.ndarray], s: dict[str, np.ndarray]) -> float:
        """The whole block run as W8A8 (`activations`; static: with the scales each input would get)
        with the layer smoothed by s, against the float block (`refs`), on the first
        `search_chunks` chunks: mean over tokens of ||dh||^2 / ||h||^2 of its output."""
        res, model = self.result_, self.model_
        w = {k: fold(k, v, s, res.mappings, res.config) for k, v in weights.items()}
        for k in LINEARS:
            if k in w:
                w[k] = fake_quant_weight(w[k])
        static = self._static(inputs.act_max, inputs.sample, s, SEARCH_ROWS)
        sim = copy.copy(model)
        sim.simulate = W8A8(self.activations, act_max=None if static is None else {
            f"blk.{il}.{short}.weight": static[inp] for inp, shorts in _SHARING.items() for short in shorts})
        return _mean_relative_error([sim.layer(il, w, x) for x in inputs.heads], refs)

    def _ggml_block_error(self, il: int, weights: dict[str, np.ndarray], inputs: LayerInputs,
                          refs: list[np.ndarray], s: dict[str, np.ndarray]) -> float:
        """The block as llama.cpp's CPU kernels run the GGUF, smoothed by s: each linear's weight
        in its planned GGML type (decoded), its input rounded to that type's vec_dot_type (Q8_0 /
        Q8_K blocks), against the float block (`refs`) on the searched chunks: mean over tokens of
        ||dh||^2 / ||h||^2 of its output."""
        from quantcli.calibrate.sensitivity import quantize_dequantize

        res, model = self.result_, self.model_
        w = {k: fold(k, v, s, res.mappings, res.config) for k, v in weights.items()}
        sim = copy.copy(model)
        sim.act_quant, sim.act_types = True, {}
        for k in LINEARS:
            name = f"blk.{il}.{k}.weight"
            t = self.weight_types.get(name, "F32")
            if k in w and t != "F32":
                w[k] = quantize_dequantize(np.ascontiguousarray(w[k], np.float32), t, None)
            sim.act_types[name] = activation_type(t)
        return _mean_relative_error([sim.layer(il, w, x) for x in inputs.heads], refs)

    # -- state --------------------------------------------------------------------------------------
    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        layer = self.result_.layers[il]
        state = {"alpha": np.array(layer.alpha, np.float64)}
        state.update({f"scale:{k}": v for k, v in layer.scales.items()})
        state.update({f"act_max:{k}": v for k, v in layer.act_max.items()})
        state.update({f"weight_max:{k}": v for k, v in layer.weight_max.items()})
        state.update({f"error_before:{k}": np.array(v, np.float64) for k, v in layer.error_before.items()})
        state.update({f"error_after:{k}": np.array(v, np.float64) for k, v in layer.error_after.items()})
        state.update({f"alpha_errors:{k}": v for k, v in layer.alpha_errors.items()})
        state.update({f"alphas:{k}": np.array(v, np.float64) for k, v in layer.alphas.items()})
        state.update({f"static_max:{k}": np.array(v, np.float64) for k, v in layer.static_max.items()})
        return state

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        got: dict[str, dict[str, Any]] = {k: {} for k in ("scale", "act_max", "weight_max", "error_before",
                                                          "error_after", "alpha_errors", "alphas", "static_max")}
        for key, arr in state.items():
            kind, _, name = key.partition(":")
            if kind in ("error_before", "error_after", "alphas", "static_max"):
                got[kind][name] = float(arr)
            elif kind in got:
                got[kind][name] = arr.astype(np.float32)
        self.result_.layers[il] = LayerSmoothing(float(state["alpha"]), got["scale"], got["act_max"],
                                                 got["error_before"], got["error_after"], got["alpha_errors"],
                                                 got["weight_max"], got["alphas"], got["static_max"])

    def result(self) -> SmoothResult:
        assert self.result_ is not None, "the observer has not run"
        return self.result_


class StaticScaleObserver(Observer, name="static-scales"):
    """The static per-tensor activation scales of a model as it is (no smoothing): per block linear
    the max|x| its int8 scale is made of (scale = max / 127), "mse"-clipped as SmoothObserver's or
    the "max", from the same sampled rows; what `report --simulate w8a8:tensor` uses for a model
    that records none."""

    def __init__(self, static_scales: str = "mse", max_rows: int = 2048) -> None:
        if static_scales not in STATIC_SCALES:
            raise UsageError(f"unknown static scales '{static_scales}'; known: {', '.join(STATIC_SCALES)}")
        if max_rows < 1:
            raise UsageError(f"max_rows must be at least 1, got {max_rows}")
        super().__init__(static_scales=static_scales, max_rows=max_rows)
        self.static_scales, self.max_rows = static_scales, max_rows
        self.values_: dict[int, dict[str, float]] = {}

    def begin(self, model: Model, chunks: np.ndarray) -> None:
        self.rows_ = sample_rows(chunks, self.max_rows)

    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Probe) -> None:
        act_max, sample = probe_inputs(il, probe, self.rows_)
        self.values_[il] = static_maxima(act_max, sample, self.static_scales)

    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        return {k: np.array(v, np.float64) for k, v in self.values_[il].items()}

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        self.values_[il] = {k: float(v) for k, v in state.items()}

    def result(self) -> dict[str, float]:
        """weight name -> the max|x| of its input's static scale."""
        return {f"blk.{il}.{short}.weight": v for il, vals in self.values_.items()
                for inp, v in vals.items() for short in _SHARING[inp]}


def smooth_model(model: Model, tokens: np.ndarray | list[int], options: RunOptions = RunOptions(),
                 progress: ProgressFn | None = None, log: Callable[[str], None] | None = None,
                 **smooth_options: Any) -> SmoothResult:
    """Run SmoothQuant's calibration over `tokens` (resumable with options.checkpoint_dir) and
    return its result; `smoothed_tensors(model.reader, result)` then gives the weights."""
    obs = SmoothObserver(**smooth_options)
    if options.kind == RunOptions.kind:
        options = replace(options, kind="smooth")
    run_calibration(model, tokens, options, [obs], progress, log)
    return obs.result()


def smoothed_tensors(reader: Any, result: SmoothResult) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the model in the reader's order as float32, the smoothed ones with their
    scales folded in (one tensor in memory at a time, for a writer)."""
    for name in reader.tensors:
        yield name, result.fold(name, reader.load_f32(name))


class SmoothedReader(ModelReader):
    """The smoothed model as a reader, computed on demand from the source and the scales: the
    tensors smoothing changes read as F32 (what a writer would store), the rest as stored."""

    def __init__(self, source: ModelReader, result: SmoothResult) -> None:
        super().__init__(source.path)
        self.format = source.format
        self.source, self.result = source, result
        self.kv = source.kv
        self.tensors = {}
        for name, info in source.tensors.items():
            if result.touched(name) and info.dtype != "F32":
                info = replace(info, dtype="F32", ggml_type=GGMLQuantizationType.F32, nbytes=4 * info.n_params)
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        if not self.result.touched(name):
            return self.source.raw(name)
        arr = self.result.fold(name, self.source.load_f32(name))
        return np.ascontiguousarray(arr, "<f4").reshape(-1).view(np.uint8)
