"""Sensitivity: what quantizing each tensor to each candidate type costs the model's output.

Two measurements per quantizable tensor t (the block's linears, the token embedding / output):

1. **Error energy** of every candidate type q, from the codecs: the output error one token
   sees, in expectation,

       err_w(t, q) = sum_ij imp_j (W_ij - dq(q(W))_ij)^2        imp_j = mean x_j^2 (the imatrix)

   (the diagonal of E||dW x||^2; rows sampled evenly for very tall tensors and scaled up), plus
   the error of the rounding ggml-cpu applies to the matmul's input for that type (Q8_0, Q8_K or
   F16 activations), measured on the calibration activations as mean ||(x_q - x) W^T||^2:
   err(t, q) = err_w(t, q) + err_act(t, act(q)). The token embedding of a model with a tied
   output is weighted by the head's input (its output role); without an imatrix entry, imp = 1.

2. **Effect on the output distribution**: the model is run with t alone quantized to the
   reference type (Q4_0; `references` may add more), and the mean KL divergence of the final
   distribution from the unquantized model's is measured on the scored positions of a few
   calibration chunks. Where t's candidates round its inputs in more than one way (K-quants and
   IQ types to Q8_K, the 32-blocks to Q8_0), each rounding of t's inputs alone is measured the same
   way (weights float); one stream per rounding with every input rounded (and the head's) gives
   the rest (`allocate.Measurement.act_scale`). Every tensor is a stream of hidden states that splits off the clean one
   at its layer and is carried, layer by layer, to the head (memory: one layer's weights and
   `n_streams * tokens * n_embd` floats; the streams are checkpointed with the hidden states).

`allocate.Measurement` turns the two into a prediction of the KL divergence of any type for t
(err -> dKLD, fitted per tensor through its references) that the solver adds over tensors.

    obs = SensitivityObserver(candidates=DEFAULT_CANDIDATES, imatrix=im)
    run_calibration(Model(reader, act_quant=False), tokens, RunOptions(ctx=512, chunks=2), [obs])
    obs.result()   # {tensor: TensorSensitivity}
"""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantcli import codecs
from quantcli.calibrate.runner import Observer, Probe
from quantcli.engine.model import LINEARS, Model
from quantcli.engine.ops import activation_type, quantize_activations
from quantcli.errors import UsageError

# llama.cpp's ladder from 1.56 to 16 bits; the 256-block types only where rows allow them
DEFAULT_CANDIDATES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "Q2_K", "Q3_K",
                      "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0", "F16")
# types llama-quantize refuses without an imatrix (tensor_requires_imatrix), except for embeddings/output
IMATRIX_ONLY = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
REFERENCES = ("Q4_0",)  # the types each tensor's effect on the output is measured at
UNQUANTIZED = frozenset({"F32"})
MAX_ERROR_ROWS = 8192  # rows measured per tensor and type (evenly spaced; the rest is scaled)
POSITIONS = 128  # scored positions per chunk whose KL divergence is measured
TOP_K = 2048  # tokens per position the KL divergence is summed over (the base's most likely)
HEAD_NAMES = ("token_embd.weight", "output.weight")
FLOAT_ACTS = frozenset({"F32", "F16", "BF16"})  # activation "roundings" too small to measure


@dataclass
class TensorSensitivity:
    """What was measured for one tensor."""

    name: str
    shape: tuple[int, ...]
    errors: dict[str, float]  # type -> err_w(t, q) (sum over rows of imp-weighted squared error)
    act_errors: dict[str, float]  # activation type -> err_act(t, act)
    kld: dict[str, float] = field(default_factory=dict)  # reference type -> measured mean KLD
    # activation type -> measured mean KLD of this tensor's inputs alone rounded to it (weights
    # float), where its candidates bring more than one rounding (K-quants' Q8_K, the rest's Q8_0)
    act_kld: dict[str, float] = field(default_factory=dict)


def check_candidates(candidates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validated candidate type names (GGML types llama.cpp loads), in the order given."""
    from quantcli.presets import ggml_type_name

    out = []
    for c in candidates:
        name = ggml_type_name(str(c).strip(), "--candidates type")
        if name in UNQUANTIZED:
            raise UsageError(f"--candidates: {name} is not a quantization type", hint="use F16 for the top rung")
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError("--candidates is empty", hint="e.g. --candidates Q4_K,Q5_K,Q6_K,Q8_0")
    return tuple(out)


def block_size(type_name: str) -> int:
    return codecs.get_codec(type_name).block_size


def candidates_for(name: str, shape: tuple[int, ...], candidates: tuple[str, ...], has_importance: bool) -> list[str]:
    """The candidates a tensor can take: blocks divide its rows; imatrix-only types need importance
    (except for the embedding and output, which llama-quantize quantizes without)."""
    cols = shape[-1]
    out = []
    for t in candidates:
        if cols % block_size(t):
            continue
        if t in IMATRIX_ONLY and not has_importance and name not in HEAD_NAMES:
            continue
        out.append(t)
    return out


def error_rows(n_rows: int) -> np.ndarray | slice:
    """The rows measured: all of them, or MAX_ERROR_ROWS evenly spaced."""
    if n_rows <= MAX_ERROR_ROWS:
        return slice(None)
    return np.unique(np.linspace(0, n_rows - 1, MAX_ERROR_ROWS).round().astype(np.int64))


def weighted_error(x: np.ndarray, type_name: str, quant_imp: np.ndarray | None,
                   weight_imp: np.ndarray | None) -> float:
    """sum_ij w_j (x - dq(q(x)))^2 with x quantized using quant_imp and weighted by weight_imp."""
    y = quantize_dequantize(x, type_name, quant_imp)
    d = (x - y).astype(np.float64)
    d *= d
    col = d.sum(axis=0)
    return float(col.sum() if weight_imp is None else col @ weight_imp.astype(np.float64))


def quantize_dequantize(x: np.ndarray, type_name: str, imp: np.ndarray | None) -> np.ndarray:
    """x as the file will hold it: quantized with `imp` (as `quantize` does) and decoded."""
    return codecs.dequantize(codecs.quantize(x, type_name, imp), type_name, x.shape)


def error_table(x: np.ndarray, types: list[str], quant_imp: np.ndarray | None,
                weight_imp: np.ndarray | None, pool: ThreadPoolExecutor | None) -> dict[str, float]:
    """err_w for every type of `types` on the measured rows of x (scaled to all rows)."""
    rows = error_rows(x.shape[0])
    part = np.ascontiguousarray(x[rows], dtype=np.float32)
    scale = x.shape[0] / part.shape[0]

    def one(t: str) -> float:
        return weighted_error(part, t, quant_imp, weight_imp) * scale

    values = list(pool.map(one, types)) if pool is not None else [one(t) for t in types]
    return dict(zip(types, values))


class SensitivityObserver(Observer, name="sensitivity"):
    """Error energies per tensor and type, and the KLD of each tensor quantized alone (see module)."""

    def __init__(self, *, candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
                 references: tuple[str, ...] = REFERENCES, positions: int = POSITIONS,
                 imatrix: Any = None, imatrix_sha256: str | None = None, threads: int = 0,
                 vocab_slice: int = 8192, top_k: int = TOP_K) -> None:
        super().__init__(candidates=list(candidates), references=list(references), positions=positions,
                         imatrix=imatrix_sha256, top_k=top_k)
        self.top_k = top_k
        self.coverage_ = 1.0  # mean probability mass of the base's top_k tokens (the KLD's support)
        self.candidates = tuple(candidates)
        self.references = tuple(references)
        self.n_positions = positions
        self.imatrix = imatrix
        self.threads = threads or os.cpu_count() or 1
        self.vocab_slice = vocab_slice
        self.tensors_: dict[str, TensorSensitivity] = {}
        self.streams_: dict[str, np.ndarray] = {}  # "tensor|ref" -> hidden states [n_chunks, ctx, n_embd]
        # "act|Q8_0": every linear's (and the head's) input rounded as a candidate type would, weights
        # float: the KLD of activation rounding alone, which scales the activation errors
        self.act_kld_: dict[str, float] = {}

    # -- helpers -------------------------------------------------------------------------------------
    def _importance(self, name: str) -> np.ndarray | None:
        return self.imatrix.importance(name) if self.imatrix is not None else None

    def _refs(self, name: str, shape: tuple[int, ...], has_importance: bool) -> list[str]:
        return [r for r in self.references if r in candidates_for(name, shape, (r,), has_importance)]

    def begin(self, model: Model, chunks: np.ndarray) -> None:
        self.model = model
        self.chunks = chunks
        ctx = chunks.shape[1]
        first = ctx // 2
        n = min(self.n_positions, ctx - 1 - first)
        self.positions_ = np.unique(np.linspace(first, ctx - 2, n).round().astype(np.int64))

    # -- per layer -----------------------------------------------------------------------------------
    def prepare_layer(self, il: int, weights: dict[str, np.ndarray], probe: Probe) -> None:
        shorts = [s for s in LINEARS if s in weights]
        names = {s: f"blk.{il}.{s}.weight" for s in shorts}
        if il == 0:
            self.streams_.update(self.embedding_streams())
            for a in self._act_types():
                self.streams_[f"act|{a}"] = np.stack([probe.input(c) for c in range(probe.n_chunks)])
        self.carry(il, weights, self.streams_)  # every split-off stream through this layer
        act = self.act_errors(weights, probe, names)
        with ThreadPoolExecutor(self.threads) as pool:
            for short in shorts:
                name = names[short]
                found = self.measure_tensor(il, short, weights, probe, act.get(name, {}), self._importance(name), pool)
                if found is not None:
                    self.tensors_[name], streams = found
                    self.streams_.update(streams)

    def carry(self, il: int, weights: dict[str, np.ndarray], streams: dict[str, np.ndarray]) -> None:
        """Move streams (key -> [n_chunks, ctx, n_embd], in place) through layer il: "act|A" ones
        with the inputs rounded to A where a candidate would, the rest as the model computes."""
        shapes = {f"blk.{il}.{x}.weight": weights[x].shape for x in LINEARS if x in weights}
        for key, s in streams.items():
            m = self._rounding(key[4:], shapes) if key.startswith("act|") else self.model
            for c in range(s.shape[0]):
                s[c] = m.layer(il, weights, np.asarray(s[c]))

    def measure_tensor(self, il: int, short: str, weights: dict[str, np.ndarray], probe: Probe,
                       act: dict[str, float], imp: np.ndarray | None,
                       pool: ThreadPoolExecutor | None) -> tuple[TensorSensitivity, dict[str, np.ndarray]] | None:
        """Linear `short` of layer il: its error table, and the streams that split off here (its
        weights quantized to each reference; its inputs alone rounded to each activation type its
        candidates bring, where they bring more than one), each already through layer il. None
        when no candidate fits it."""
        model = self.model
        name = f"blk.{il}.{short}.weight"
        w = weights[short]
        types = candidates_for(name, w.shape, self.candidates, imp is not None)
        if not types:
            return None
        found = TensorSensitivity(name, tuple(w.shape), error_table(w, types, imp, imp, pool), act)
        streams: dict[str, np.ndarray] = {}
        for ref in self._refs(name, w.shape, imp is not None):
            edited = dict(weights)
            edited[short] = quantize_dequantize(w, ref, imp)
            stream = np.empty((probe.n_chunks,) + probe.input(0).shape, np.float32)
            for c in range(probe.n_chunks):
                stream[c] = model.layer(il, edited, probe.input(c))
            streams[f"{name}|{ref}"] = stream
        acts = sorted({activation_type(t) for t in types} - FLOAT_ACTS)
        for a in acts if len(acts) > 1 else ():  # a choice of roundings: each one measured
            m = copy.copy(model)
            m.act_quant = True
            m.act_types = {f"blk.{il}.{x}.weight": (a if x == short else "F32") for x in LINEARS if x in weights}
            stream = np.empty((probe.n_chunks,) + probe.input(0).shape, np.float32)
            for c in range(probe.n_chunks):
                stream[c] = m.layer(il, weights, probe.input(c))
            streams[f"{name}|act:{a}"] = stream
        return found, streams

    def _act_types(self) -> list[str]:
        """The activation roundings the candidates bring (each measured by a stream of its own)."""
        return sorted({activation_type(t) for t in self.candidates} - FLOAT_ACTS)

    def _rounds(self, name: str, shape: tuple[int, ...], act: str) -> bool:
        """Whether a candidate of this tensor rounds its inputs to `act`."""
        return any(activation_type(t) == act for t in candidates_for(name, shape, self.candidates, True))

    def _rounding(self, act: str, shapes: dict[str, tuple[int, ...]]) -> Model:
        """The model with the inputs of these linears rounded to `act` (where a candidate would)."""
        m = copy.copy(self.model)
        m.act_quant = True
        m.act_types = {n: act if self._rounds(n, shape, act) else "F32" for n, shape in shapes.items()}
        return m

    def act_errors(self, weights: dict[str, np.ndarray], probe: Probe,
                   names: dict[str, str]) -> dict[str, dict[str, float]]:
        """mean ||(q(x) - x) W^T||^2 per linear (of `names`: short -> full name) and activation
        type of its candidates, over one pass of the chunks through the layer."""
        by_name = {v: k for k, v in names.items()}
        sums: dict[str, dict[str, float]] = {}
        tokens: dict[str, int] = {}

        def hook(name: str, x: np.ndarray) -> None:
            if name not in by_name:
                return
            w = weights[by_name[name]]
            types = candidates_for(name, w.shape, self.candidates, True)
            d = sums.setdefault(name, {})
            for a in sorted({activation_type(t) for t in types} - {"F32"}):
                y = ((quantize_activations(x, a) - x) @ w.T).astype(np.float64)
                d[a] = d.get(a, 0.0) + float(np.einsum("ij,ij->", y, y))
            tokens[name] = tokens.get(name, 0) + x.shape[0]

        probe(hook)
        return {name: {a: v / max(tokens[name], 1) for a, v in d.items()} for name, d in sums.items()}

    def embedding_streams(self) -> dict[str, np.ndarray]:
        """The token embedding quantized to each reference: a stream from the start (a tied
        output's rows are quantized again at the end)."""
        model = self.model
        reader = model.reader
        name = "token_embd.weight"
        info = reader.tensors[name]
        cfg = model.config
        streams = {}
        for ref in self._refs(name, info.shape, False):
            data = codecs.quantize(reader.load_f32(name, copy=False).reshape(info.shape[0], -1), ref, None)
            uniq, inverse = np.unique(self.chunks.reshape(-1), return_inverse=True)
            table = codecs.dequantize(data[uniq], ref, (len(uniq), info.shape[-1]))
            if cfg.embed_scale != 1.0:
                table *= np.float32(cfg.embed_scale)
            streams[f"{name}|{ref}"] = table[inverse].reshape(self.chunks.shape + (cfg.n_embd,))
        return streams

    # -- the head ------------------------------------------------------------------------------------
    def end(self, model: Model, hidden: np.ndarray) -> None:
        pos = self.positions_
        self.finish(model, hidden[:, pos], {k: s[:, pos] for k, s in self.streams_.items()})

    def finish(self, model: Model, hidden: np.ndarray, streams_at: dict[str, np.ndarray]) -> None:
        """The head's part, from the final hidden states at the scored positions, the clean ones
        and each stream's ([n_chunks, n_positions, n_embd]): the output's error table and the
        KL divergence of every stream."""
        E = model.config.n_embd
        base = model.head_input(np.ascontiguousarray(hidden).reshape(-1, E))
        head_name = model.output_name
        out_info = model.reader.tensors[head_name]
        head_imp = np.mean(base.astype(np.float64) ** 2, axis=0).astype(np.float32)
        streams = {k: model.head_input(np.ascontiguousarray(s).reshape(-1, E)) for k, s in streams_at.items()}
        for a in self._act_types():  # the head's input too, where its candidates round it
            if self._rounds(head_name, model.reader.tensors[head_name].shape, a):
                streams[f"act|{a}"] = quantize_activations(streams[f"act|{a}"], a)
        # the output's own error table and its references (tied: the embedding's rows)
        x = model.reader.load_f32(head_name, copy=False).reshape(out_info.shape[0], -1)
        types = candidates_for(head_name, out_info.shape, self.candidates, True)
        with ThreadPoolExecutor(self.threads) as pool:
            errors = error_table(x, types, None, head_imp, pool)
        act = self._head_act_errors(base, types)
        self.tensors_[head_name] = TensorSensitivity(head_name, tuple(out_info.shape), errors, act)
        head_rows = {}  # stream -> the output rows it uses instead of the model's: (bytes, type)
        for ref in self._refs(head_name, out_info.shape, False):
            head_rows[f"{head_name}|{ref}"] = (codecs.quantize(x, ref, None), ref)
            streams.setdefault(f"{head_name}|{ref}", base)  # tied: the embedding's stream
        if head_name != "token_embd.weight" and "token_embd.weight" in model.reader.tensors:
            emb = model.reader.tensors["token_embd.weight"]
            e = model.reader.load_f32("token_embd.weight", copy=False).reshape(emb.shape[0], -1)
            etypes = candidates_for("token_embd.weight", emb.shape, self.candidates, True)
            with ThreadPoolExecutor(self.threads) as pool:
                self.tensors_["token_embd.weight"] = TensorSensitivity(
                    "token_embd.weight", tuple(emb.shape), error_table(e, etypes, None, None, pool), {})
        klds = self._klds(model, base, streams, head_rows)
        for key, v in klds.items():
            name, ref = key.split("|")
            if name == "act":
                self.act_kld_[ref] = v
            elif ref.startswith("act:"):
                self.tensors_[name].act_kld[ref[4:]] = v
            else:
                self.tensors_[name].kld[ref] = v

    def _head_act_errors(self, h: np.ndarray, types: list[str]) -> dict[str, float]:
        model = self.model
        acts = sorted({activation_type(t) for t in types} - {"F32"})
        sums = dict.fromkeys(acts, 0.0)
        rounded = {a: quantize_activations(h, a) - h for a in acts}
        buf = np.empty(self.vocab_slice * h.shape[1], np.float32)
        for v0, v1 in model.vocab_slices(self.vocab_slice):
            rows = model.output_rows(v0, v1, buf)
            for a, dx in rounded.items():
                y = (dx @ rows.T).astype(np.float64)
                sums[a] += float(np.einsum("ij,ij->", y, y))
        return {a: v / h.shape[0] for a, v in sums.items()}

    def _klds(self, model: Model, base: np.ndarray, streams: dict[str, np.ndarray],
              head_rows: dict[str, tuple[np.ndarray, str]]) -> dict[str, float]:
        """Mean KL(base || stream) over the scored positions.

        KL(P || Q) = sum_i p_i (a_i - z_i) + log sum_i p_i exp(z_i - a_i) for logits a (base) and z:
        both sums are expectations under P, so they are taken over the `top_k` most likely tokens
        of each position under the base (exact when top_k covers the vocabulary), the rest of P's
        mass counted with z - a = 0. The base's full distribution is computed once (one pass of
        the head over the vocabulary); each stream then needs only the logits of those tokens."""
        top, logp, tail = self._base_top(model, base)
        self.coverage_ = float(1.0 - tail.mean())
        p = np.exp(logp)  # [P, K]
        a = self._top_logits(model, base[:, None, :], top, None, p, tail, None)
        keys = list(streams)
        plain = [k for k in keys if k not in head_rows]
        sums: dict[str, float] = {}
        if plain:
            H = np.stack([streams[k] for k in plain], axis=1)  # [P, S, E]
            sums.update(zip(plain, self._top_logits(model, H, top, None, p, tail, a)))
        for k, quantized in head_rows.items():
            sums[k] = self._top_logits(model, streams[k][:, None, :], top, quantized, p, tail, a)[0]
        return {k: max(v / base.shape[0], 0.0) for k, v in sums.items()}

    def _base_top(self, model: Model, base: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per scored position: the top_k token ids under the base, their log-probabilities, and
        the probability mass outside them."""
        P = base.shape[0]
        V = model.config.n_vocab
        K = min(self.top_k, V)
        top = np.zeros((P, 0), np.int64)
        top_z = np.zeros((P, 0), np.float32)
        m = np.full(P, -np.inf)
        s = np.zeros(P)
        buf = np.empty(self.vocab_slice * base.shape[1], np.float32)
        for v0, v1 in model.vocab_slices(self.vocab_slice):
            z = model.logits(base, model.output_rows(v0, v1, buf))
            m_new = np.maximum(m, z.max(axis=1))
            s = s * np.exp(m - m_new) + np.exp(z - m_new[:, None].astype(np.float32)).sum(axis=1, dtype=np.float64)
            m = m_new
            cand_z = np.concatenate([top_z, z], axis=1)
            cand = np.concatenate([top, np.broadcast_to(np.arange(v0, v1), z.shape)], axis=1)
            if cand.shape[1] > K:
                keep = np.argpartition(-cand_z, K - 1, axis=1)[:, :K]
                cand_z = np.take_along_axis(cand_z, keep, axis=1)
                cand = np.take_along_axis(cand, keep, axis=1)
            top, top_z = cand, cand_z
        lse = m + np.log(s)
        logp = top_z.astype(np.float64) - lse[:, None]
        tail = np.clip(1.0 - np.exp(logp).sum(axis=1), 0.0, 1.0)
        return top, logp, tail

    def _top_logits(self, model: Model, h: np.ndarray, top: np.ndarray, quantized: tuple[np.ndarray, str] | None,
                    p: np.ndarray, tail: np.ndarray, a: np.ndarray | None, block: int = 8) -> Any:
        """The logits of the tokens `top` [P, K] for hidden states h [P, S, E]: without `a`, those
        of the one stream h [P, 1, E] ([P, K], the base's); with the base's `a`, each stream's KL
        divergence summed over the positions ([S]). `quantized`: (bytes, type) of output rows to
        use instead of the model's (the tied embedding's stream)."""
        P, S, E = h.shape
        K = top.shape[1]
        out = np.empty((P, K), np.float64) if a is None else np.zeros(S)
        cap = model.config.final_logit_softcap
        for p0 in range(0, P, block):
            p1 = min(P, p0 + block)
            ids = top[p0:p1].reshape(-1)
            if quantized is None:
                rows = model.rows(model.output_name, ids)
            else:
                data, t = quantized
                rows = codecs.dequantize(np.ascontiguousarray(data[ids]), t, (len(ids), E))
            z = np.matmul(h[p0:p1], rows.reshape(p1 - p0, K, E).transpose(0, 2, 1))  # [b, S, K]
            if cap:
                z = np.tanh(z * np.float32(1.0 / cap)) * np.float32(cap)
            if a is None:
                out[p0:p1] = z[:, 0]
            else:
                out += _kl(p[p0:p1], tail[p0:p1], a[p0:p1], z.astype(np.float64))
        return out

    # -- state ---------------------------------------------------------------------------------------
    def layer_state(self, il: int) -> dict[str, np.ndarray]:
        prefix = f"blk.{il}."
        out = {}
        for name, t in self.tensors_.items():
            if name.startswith(prefix):
                out[name] = np.array([_pack(t)])
        return out

    def load_layer_state(self, il: int, state: dict[str, np.ndarray]) -> None:
        for name, v in state.items():
            self.tensors_[name] = _unpack(str(v[0]))

    def carry_state(self) -> dict[str, np.ndarray]:
        out = {f"stream{i}": s for i, s in enumerate(self.streams_.values())}
        out["stream_names"] = np.array(list(self.streams_), dtype=str)
        return out

    def load_carry_state(self, state: dict[str, np.ndarray]) -> None:
        self.streams_ = {str(n): np.array(state[f"stream{i}"]) for i, n in enumerate(state["stream_names"])}

    def result(self) -> dict[str, TensorSensitivity]:
        return self.tensors_


def _kl(p: np.ndarray, tail: np.ndarray, a: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Sum over positions of sum p (a - z) + log(sum p exp(z - a) + tail), per stream.
    p, a [P, K]; tail [P]; z [P, S, K] -> [S]."""
    d = z - a[:, None, :]  # [P, S, K]
    first = -np.einsum("pk,psk->ps", p, d)
    shift = d.max(axis=2).clip(min=0.0)  # [P, S]
    d -= shift[..., None]
    np.exp(d, out=d)
    second = np.log(np.einsum("pk,psk->ps", p, d) + tail[:, None] * np.exp(-shift)) + shift
    return (first + second).sum(axis=0)


def _pack(t: TensorSensitivity) -> str:
    return json.dumps({"name": t.name, "shape": list(t.shape), "errors": t.errors, "act": t.act_errors,
                       "kld": t.kld, "act_kld": t.act_kld})


def _unpack(text: str) -> TensorSensitivity:
    d = json.loads(text)
    return TensorSensitivity(d["name"], tuple(d["shape"]), d["errors"], d["act"], d["kld"], d["act_kld"])

