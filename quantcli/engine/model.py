"""A llama-family decoder run one layer at a time over many chunks.

Layer-sequential: every chunk's hidden state goes through layer i before layer i+1 is loaded, so
memory holds one layer's weights (dequantized to float32) plus the hidden states
[n_chunks, n_ctx, n_embd] (in RAM or a memory-mapped file). The graph is llama.cpp's
(`src/models/{llama,qwen2,qwen3,gemma3}.cpp`, `build_ffn`, `build_attn`); a KV cache in fp16 is
emulated by rounding k and v to fp16, as llama.cpp stores them, and with `act_quant` every matmul
input is rounded to the weight's ggml vec_dot_type (Q8_0, Q8_K, F16) as ggml-cpu's kernels do —
for quantized weights that rounding, not the weights, is most of llama-perplexity's difference
between an F32 model and one quantized from it without loss. With `simulate=W8A8(...)`
(engine/w8a8.py) the block linears run as an int8 engine runs them instead: int8 weights per
channel, int8 activations per token or per tensor; the head and the embeddings stay as they are.

    model = Model(reader)
    hidden = model.embed(tokens)                       # [n_chunks, n_ctx, n_embd]
    run_layers(model, hidden, hook=imatrix.collect)    # in place, layer by layer
    h = model.final_norm(hidden[c])                    # then model.output_rows(v0, v1) per slice
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from quantcli.engine.config import ModelConfig
from quantcli.engine.ops import (activation_type, attention, decode_attention, gelu, quantize_activations,
                                 rms_norm, rope, rope_cache, round_fp16, silu)
from quantcli.engine.w8a8 import W8A8
from quantcli.progress import Progress, ProgressFn, progress_or_noop
from quantcli.errors import InputError

Hook = Callable[[str, np.ndarray], None]  # (weight name, matmul input [n_tokens, n_in])
OutputHook = Callable[[str, np.ndarray], None]  # (weight name, matmul output [n_tokens, n_out], bias added)

# per-layer tensors by short name; those marked optional may be absent
_LAYER_TENSORS = {
    "attn_norm": True, "attn_q": True, "attn_k": True, "attn_v": True, "attn_output": True,
    "ffn_norm": True, "ffn_gate": True, "ffn_up": True, "ffn_down": True,
    "attn_q_norm": False, "attn_k_norm": False, "post_attention_norm": False, "post_ffw_norm": False,
}
_BIASES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
LINEARS = _BIASES  # the block's linears (what `simulate` runs as W8A8)


class Model:
    """Weights on demand from a model reader (`meta`, `tensors`, `load_f32`, `raw`)."""

    def __init__(self, reader: Any, kv_f16: bool = True, act_quant: bool = True,
                 simulate: W8A8 | None = None) -> None:
        self.reader = reader
        self.config = ModelConfig.from_reader(reader)
        self.kv_f16 = kv_f16  # round k, v to fp16 as llama.cpp's default KV cache does
        self.act_quant = act_quant  # round matmul inputs to the weight's vec_dot_type like ggml-cpu
        # run the block linears as an int8 engine would (instead of act_quant's rounding for them);
        # layer_weights then gives their weights already int8-rounded
        self.simulate = simulate
        # with act_quant: the activation type of a weight by name, instead of its stored type's
        # (a measurement rounds the inputs of float weights as a quantized type's would be)
        self.act_types: dict[str, str] = {}
        self.output_name = "output.weight" if "output.weight" in reader.tensors else "token_embd.weight"
        ff = reader.tensors.get("rope_freqs.weight")
        self._freq_factors = None if ff is None else reader.load_f32("rope_freqs.weight").tobytes()
        self._check_tensors()

    def _check_tensors(self) -> None:
        cfg, names = self.config, self.reader.tensors
        for il in range(cfg.n_layer):
            for short, required in _LAYER_TENSORS.items():
                if required and f"blk.{il}.{short}.weight" not in names:
                    raise InputError(f"tensor blk.{il}.{short}.weight is missing for {cfg.arch}")
        for short in ("attn_q_norm", "attn_k_norm") if cfg.qk_norm else ():
            if f"blk.0.{short}.weight" not in names:
                raise InputError(f"{cfg.arch} needs blk.0.{short}.weight")

    # -- weights -------------------------------------------------------------------------------
    def layer_weights(self, il: int) -> dict[str, np.ndarray]:
        """Layer il's tensors as float32, by short name ('attn_q', 'attn_q.bias', ...); with
        `simulate`, the linears' weights as dequant(int8 per channel)."""
        names = self.reader.tensors
        w = {}
        for short in _LAYER_TENSORS:
            name = f"blk.{il}.{short}.weight"
            if name in names:
                w[short] = self.reader.load_f32(name)
                self.reader.release(name)  # its stored bytes are decoded: drop their mapped pages
                if self.simulate is not None and short in LINEARS and self.simulate.int8(name):
                    w[short] = self.simulate.weight(w[short], name)
        for short in _BIASES:
            name = f"blk.{il}.{short}.bias"
            if name in names:
                w[short + ".bias"] = self.reader.load_f32(name)
        return w

    def rows(self, name: str, index: np.ndarray | slice, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of a 2-D tensor as float32, dequantizing only those rows (into the front of `out`,
        a reusable float32 buffer, when it is large enough; F32 rows are a view of the file)."""
        from quantcli.codecs import get_codec

        info = self.reader.tensors[name]
        n_rows, n_cols = info.shape
        raw = self.reader.raw(name).reshape(n_rows, info.nbytes // n_rows)
        sel = raw[index]
        if info.dtype == "F32":
            return np.ascontiguousarray(sel).view(np.float32)
        n = sel.shape[0]
        dest = None
        if out is not None and out.size >= n * n_cols:
            dest = out.reshape(-1)[: n * n_cols].reshape(n, n_cols)
        return get_codec(info.ggml_type).dequantize_rows(np.ascontiguousarray(sel), n_cols, out=dest)

    def matmul_input(self, name: str, x: np.ndarray) -> np.ndarray:
        """x as ggml-cpu feeds it to a matmul with weight `name` (rounded when act_quant)."""
        if not self.act_quant:
            return x
        return quantize_activations(x, self.activation_type(name))

    def activation_type(self, name: str) -> str:
        """The type ggml-cpu rounds the inputs of weight `name` to (act_types first)."""
        return self.act_types.get(name) or activation_type(self.reader.tensors[name].dtype)

    def output_rows(self, v0: int, v1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows v0:v1 of the output projection (tied to token_embd when output.weight is absent),
        dequantized into `out` when given (see `rows`)."""
        return self.rows(self.output_name, slice(v0, v1), out)

    # -- forward pieces ----------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """get_rows(token_embd) (* sqrt(n_embd) for gemma): tokens [...] -> [..., n_embd]."""
        cfg = self.config
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.n_vocab):
            raise InputError(f"token ids must be in [0, {cfg.n_vocab}); got {tokens.min()}..{tokens.max()}")
        uniq, inverse = np.unique(tokens.reshape(-1), return_inverse=True)
        table = self.rows("token_embd.weight", uniq)
        if cfg.embed_scale != 1.0:
            table *= np.float32(cfg.embed_scale)
        if out is None:
            out = np.empty(tokens.shape + (cfg.n_embd,), np.float32)
        out[...] = table[inverse].reshape(out.shape)
        return out

    def layer(self, il: int, w: dict[str, np.ndarray], x: np.ndarray, hook: Hook | None = None,
              on_output: OutputHook | None = None,
              cache: "LayerCache | list[LayerCache] | None" = None,
              counts: list[int] | None = None) -> np.ndarray:
        """One transformer block on one chunk: x [T, n_embd] -> [T, n_embd]. `hook` sees every
        matmul's input (before the activation rounding or W8A8 quantization), `on_output` its output.
        With a `cache` (incremental decoding) x is the T tokens after the cache's positions: their
        k and v are appended to it and they attend to everything it holds. With a list of caches,
        x holds several sequences' next tokens, consecutive rows per sequence: `counts[b]` of them
        for sequence b (one each by default: a batch decoded together)."""
        cfg = self.config
        T = x.shape[0]
        batch = isinstance(cache, list)
        if batch:
            counts = [1] * len(cache) if counts is None else list(counts)
            if len(counts) != len(cache) or sum(counts) != T:
                raise ValueError(f"{len(cache)} caches with {sum(counts or [])} rows for {T} rows")
            ends = np.cumsum([0] + counts)

        # q/k/v and gate/up share an input: round it once. The entry keeps its input alive, so
        # the id in the key cannot be reused by a later array.
        rounded: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

        def linear(name: str, h: np.ndarray) -> np.ndarray:
            full = f"blk.{il}.{name}.weight"
            if hook is not None:
                hook(full, h)
            xin = h
            if self.simulate is not None:
                if self.simulate.int8(full):  # (a linear the engine keeps in float sees its input as it is)
                    # q/k/v (gate/up) share per-token scales; static per-tensor ones are per weight
                    key = (id(h), "" if self.simulate.dynamic(full) else full)
                    if key not in rounded:
                        rounded[key] = (h, self.simulate.activations(full, h))
                    xin = rounded[key][1]
            elif self.act_quant:
                key = (id(h), self.activation_type(full))
                if key not in rounded:
                    rounded[key] = (h, quantize_activations(h, key[1]))
                xin = rounded[key][1]
            y = xin @ w[name].T  # [T, n_in] @ [n_in, n_out]
            b = w.get(name + ".bias")
            if b is not None:
                y = y + b
            if on_output is not None:
                on_output(full, y)
            return y

        # attention
        h = rms_norm(x, w["attn_norm"], cfg.norm_eps)  # [T, n_embd]
        q = linear("attn_q", h).reshape(T, cfg.n_head, cfg.head_dim)
        k = linear("attn_k", h).reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = linear("attn_v", h).reshape(T, cfg.n_head_kv, cfg.head_dim_v)
        if cfg.qk_norm:
            q = rms_norm(q, w["attn_q_norm"], cfg.norm_eps)
            k = rms_norm(k, w["attn_k_norm"], cfg.norm_eps)
        swa = cfg.is_swa(il)
        base, scale = (cfg.rope_base_swa, cfg.rope_scale_swa) if swa else (cfg.rope_base, cfg.rope_scale)
        if cache is None:
            cos, sin = rope_cache(T, cfg.n_rot, base, scale, self._freq_factors)
        else:  # rows are independent of the table's length: those of the tokens' positions
            first = cache[0] if batch else cache
            pos = (np.concatenate([np.arange(c.n, c.n + k) for c, k in zip(cache, counts)]) if batch
                   else np.arange(cache.n, cache.n + T))
            cos, sin = first.rope(int(pos.max()) + 1, cfg.n_rot, base, scale, self._freq_factors)
            cos, sin = cos[pos], sin[pos]
        q = rope(q, cos, sin, cfg.rope_neox)  # [T, n_head, d]
        k = rope(k, cos, sin, cfg.rope_neox)  # [T, n_head_kv, d]
        if self.kv_f16:
            k = round_fp16(k)
            v = round_fp16(v)
        window = cfg.sliding_window if swa else 0
        scale_qk = cfg.attn_scale
        if cfg.arch == "gemma3":  # gemma scales q before the product (gemma3.cpp)
            q *= np.float32(cfg.attn_scale)
            scale_qk = 1.0
        if batch and T == len(cache):  # one new token per sequence, each against its own cache
            a = decode_attention(q, [c.append(k[b:b + 1], v[b:b + 1]) for b, c in enumerate(cache)],
                                 scale_qk, window)
        elif batch:  # each sequence's rows against its own cache
            a = np.concatenate([attention(q[r0:r1], *c.append(k[r0:r1], v[r0:r1]), scale_qk, window)
                                for c, r0, r1 in zip(cache, ends[:-1], ends[1:])])
        else:
            if cache is not None:
                k, v = cache.append(k, v)  # every position so far
            a = attention(q, k, v, scale_qk, window)
        a = linear("attn_output", a)  # [T, n_head*dv] -> [T, n_embd]
        if cfg.post_norms:
            a = rms_norm(a, w["post_attention_norm"], cfg.norm_eps)
        x = x + a

        # feed-forward: down(act(gate(h)) * up(h))
        h = rms_norm(x, w["ffn_norm"], cfg.norm_eps)
        g = linear("ffn_gate", h)  # [T, n_ff]
        u = linear("ffn_up", h)
        h = gelu(g, times=u) if cfg.act == "gelu" else silu(g) * u
        return x + self.ffn_residual(w, linear("ffn_down", h))

    def ffn_residual(self, w: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
        """What the feed-forward block adds to the residual stream, from ffn_down's output y:
        y itself, or y through the post-feed-forward norm (gemma3)."""
        if self.config.post_norms:
            return rms_norm(y, w["post_ffw_norm"], self.config.norm_eps)
        return y

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "_output_norm"):
            self._output_norm = self.reader.load_f32("output_norm.weight")
        return rms_norm(x, self._output_norm, self.config.norm_eps)

    def head_input(self, x: np.ndarray) -> np.ndarray:
        """Final norm, then the rounding the output matmul applies: [n, n_embd] -> [n, n_embd]."""
        return self.matmul_input(self.output_name, self.final_norm(x))

    def logits(self, h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """h [n, n_embd] (from head_input) against output rows [V, n_embd] -> [n, V]."""
        z = h @ rows.T
        cap = self.config.final_logit_softcap
        if cap:
            z = np.tanh(z * np.float32(1.0 / cap)) * np.float32(cap)
        return z

    def vocab_slices(self, n: int) -> Iterator[tuple[int, int]]:
        V = self.config.n_vocab
        for v0 in range(0, V, n):
            yield v0, min(V, v0 + n)


class LayerCache:
    """One layer's keys and values of the positions decoded so far (fp16-rounded as llama.cpp's
    KV cache stores them when the model's kv_f16), grown by doubling, and the rope tables."""

    def __init__(self, n_kv: int, d: int, dv: int, capacity: int = 256) -> None:
        self.n = 0
        self.k = np.empty((capacity, n_kv, d), np.float32)
        self.v = np.empty((capacity, n_kv, dv), np.float32)
        self._rope: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def append(self, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, t = self.n, k.shape[0]
        if n + t > self.k.shape[0]:
            cap = max(2 * self.k.shape[0], n + t)
            self.k = np.concatenate([self.k[:n], np.empty((cap - n,) + self.k.shape[1:], np.float32)])
            self.v = np.concatenate([self.v[:n], np.empty((cap - n,) + self.v.shape[1:], np.float32)])
        self.k[n:n + t], self.v[n:n + t] = k, v
        self.n = n + t
        return self.k[: self.n], self.v[: self.n]

    def copy(self) -> "LayerCache":
        """An independent cache of the same positions (a sequence forks), sharing the rope tables."""
        c = LayerCache.__new__(LayerCache)
        c.n, c.k, c.v, c._rope = self.n, self.k.copy(), self.v.copy(), self._rope
        return c

    def share_rope(self, other: "LayerCache") -> None:
        """Use `other`'s rope tables (they depend on the layer's rope settings only)."""
        self._rope = other._rope

    def rope(self, n_pos: int, n_rot: int, base: float, scale: float,
             freq_factors: bytes | None) -> tuple[np.ndarray, np.ndarray]:
        key = (n_rot, base, scale, freq_factors)
        have = self._rope.get(key)
        if have is None or have[0].shape[0] < n_pos:
            have = rope_cache(max(n_pos, 2 * (have[0].shape[0] if have else 128)), n_rot, base, scale, freq_factors)
            self._rope[key] = have
        return have


def run_layers(model: Model, hidden: np.ndarray, hook: Hook | None = None, start: int = 0,
               stop: int | None = None, progress: ProgressFn | None = None,
               on_layer_done: Callable[[int], None] | None = None) -> np.ndarray:
    """Pass every chunk of hidden [n_chunks, n_ctx, n_embd] through layers start..stop-1, in
    place: all chunks through layer i, then layer i+1 is loaded."""
    report = progress_or_noop(progress)
    stop = model.config.n_layer if stop is None else stop
    for il in range(start, stop):
        w = model.layer_weights(il)
        for c in range(hidden.shape[0]):
            hidden[c] = model.layer(il, w, np.asarray(hidden[c]), hook)
        del w
        if on_layer_done is not None:
            on_layer_done(il)
        report(Progress("layer", il + 1, model.config.n_layer, f"blk.{il}"))
    return hidden


def forward(model: Model, tokens: np.ndarray, hook: Hook | None = None) -> np.ndarray:
    """Whole model, one chunk at a time (all layers for chunk 0, then chunk 1 ...): full logits
    [n_chunks, n_ctx, n_vocab]. For tests and small vocabularies; perplexity streams instead."""
    tokens = np.atleast_2d(np.asarray(tokens))
    weights = [model.layer_weights(il) for il in range(model.config.n_layer)]
    rows = model.output_rows(0, model.config.n_vocab)
    out = []
    for chunk in tokens:
        x = model.embed(chunk)
        for il, w in enumerate(weights):
            x = model.layer(il, w, x, hook)
        out.append(model.logits(model.head_input(x), rows))
    return np.stack(out)
