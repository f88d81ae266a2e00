"""LoRA adapters merged into a base model: W' = W + S * (alpha / r) * B @ A, per tensor, as float32
(each value rounded once from a float64 sum taken in a fixed order: `Delta.add_to`).

    adapters = [load_adapter(AdapterSpec(Path("my-adapter"), scale=1.0), base)]
    view = MergedView(base, adapters)     # a ModelReader: merged tensors read as F32, rows on demand

Two adapter formats:

- a PEFT directory: `adapter_config.json` (`peft_type` LORA, `r`, `lora_alpha`, `use_rslora`,
  `rank_pattern`, `alpha_pattern`, `target_modules`, `fan_in_fan_out`) and
  `adapter_model.safetensors` with `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight`
  [out, r] (`lora_embedding_A` [r, vocab] / `lora_embedding_B` [dim, r] for embeddings). The
  factor is alpha / r, or alpha / sqrt(r) with rsLoRA (`peft.tuners.lora.layer.LoraLayer.update_layer`);
  per-module r and alpha come from the patterns as PEFT matches them (`(.*\\.)?KEY$`). Hugging
  Face module names are mapped to the base's tensors: directly for a safetensors base that keeps
  HF names, through `convert.to_hf.HFLayout` for a GGUF-shaped one, where llama's q/k rows are in
  llama.cpp's rotary order, so B's rows are permuted like the weight's (delta = B @ A: permuting
  its rows is permuting B's). An embedding's delta is (B @ A)^T, as PEFT's `Embedding` merges it;
  when the output head is tied to the embedding, the merge changes both, as merge_and_unload does.
- a llama.cpp GGUF adapter (`convert_lora_to_gguf.py`): `general.type` adapter, `adapter.type`
  lora, `adapter.lora.alpha`, tensors `<gguf name>.lora_a` [r, in] and `.lora_b` [out, r]
  (numpy order), token_embd's flipped ([vocab, r] and [dim, r]); the factor is alpha / r, or 1 when
  alpha is 0, and `*_norm.weight` tensors are skipped, as llama.cpp's `llama_adapter_lora_init`
  does. Its names and row order are the base GGUF's already.

`fan_in_fan_out` describes Conv1D weights stored [in, out] (GPT-2); every supported architecture's
targets are nn.Linear, for which PEFT itself resets it to False, and so does the merge.

Dropout (`lora_dropout`) is a training-time mask, scaled by 1 / (1 - p) so that its expectation is
the identity; at inference p = 0, so a merge ignores it (FALSIFY-QO-004).

Refused with one line each: DoRA (`use_dora`), `lora_bias`, other PEFT types, `modules_to_save`
weights, aLoRA GGUF adapters, a rank other than the config's, a shape other than the base's, a
module or target the base does not have, NaN/Inf in the adapter, and a quantized base tensor without
`allow_requantize`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType

from quantcli.codecs.base import FirstUseKernel
from quantcli.errors import InputError, UsageError
from quantcli.formats import ModelReader, open_model
from quantcli.formats.base import TensorInfo
from quantcli.inputs import read_small_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FLOAT_TYPES = ("F32", "F16", "BF16")
_PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)"
                       r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?")


@dataclass(frozen=True)
class AdapterSpec:
    path: Path  # a PEFT directory or a llama.cpp GGUF adapter
    scale: float = 1.0  # S in W + S * (alpha / r) * B @ A (llama.cpp's --lora-scaled)


@dataclass(frozen=True)
class Delta:
    """One base tensor's low-rank update: left @ right * factor, in the base's layout and row order."""

    left: np.ndarray  # [out, r] float32
    right: np.ndarray  # [r, in] float32
    factor: float  # S * alpha / r (or / sqrt(r)); float32 when applied

    def add_to(self, w: np.ndarray, start: int) -> None:
        """w += rows [start, start + len(w)) of the update, in place (float32 (rows, in)): each value
        float32(w + factor * sum_k left[i, k] * right[k, j]) with the sum in float64 in k order, so
        a row is the same whatever slice it is computed in (a BLAS product is not: its blocking
        depends on the slice's size), and quantizing gives the same bytes for any slicing."""
        _kernel(self.left[start:start + w.shape[0]], self.right, float(self.factor), w)


def _add_lowrank(left, right, factor, w):
    # left (rows, r) float32, right (r, cols) float32, w (rows, cols) float32, updated in place
    rows, r = left.shape
    cols = right.shape[1]
    acc = np.empty(cols, np.float64)
    for i in range(rows):
        acc[:] = 0.0
        for k in range(r):
            lk = np.float64(left[i, k])
            for j in range(cols):
                acc[j] += lk * np.float64(right[k, j])
        for j in range(cols):
            w[i, j] = np.float32(np.float64(w[i, j]) + factor * acc[j])


_kernel = FirstUseKernel(_add_lowrank)


@dataclass(frozen=True)
class Adapter:
    path: Path
    format: str  # "peft" or "gguf"
    sha256: str  # of the weights file
    scale: float
    alpha: float
    ranks: tuple[int, ...]  # the distinct ranks of its tensors
    deltas: dict[str, list[Delta]] = field(repr=False)  # base tensor name -> its updates

    def provenance(self) -> dict[str, Any]:
        return {"file": self.path.name, "format": self.format, "sha256": self.sha256, "scale": self.scale,
                "alpha": self.alpha, "rank": list(self.ranks), "tensors": len(self.deltas)}


# -- loading ---------------------------------------------------------------------------------------


def load_adapter(spec: AdapterSpec, base: ModelReader) -> Adapter:
    """The adapter at spec.path, checked against `base` and mapped onto its tensors."""
    path = Path(spec.path)
    if not math.isfinite(spec.scale):
        raise UsageError(f"--lora-scale {spec.scale} for {path} is not a finite number")
    if path.is_dir():
        return _load_peft(path, spec.scale, base)
    if not path.exists():
        raise InputError(f"{path}: no such LoRA adapter (a PEFT directory or a GGUF adapter file)")
    return _load_gguf(path, spec.scale, base)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft.tuners.tuners_utils' get_pattern_key: the first key K with (.*\\.)?K$ matching the module."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _peft_config(path: Path) -> dict[str, Any]:
    cfg_path = path / PEFT_CONFIG
    cfg = read_small_json(cfg_path, "PEFT adapter config", limit=1 << 20)
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise InputError(f"{cfg_path}: peft_type {kind} cannot be merged; only LORA adapters can")
    if cfg.get("use_dora"):
        raise InputError(f"{cfg_path}: a DoRA adapter (use_dora) cannot be merged: its magnitude vector "
                         "rescales the merged weight; only plain LoRA is supported")
    if cfg.get("lora_bias"):
        raise InputError(f"{cfg_path}: lora_bias adapters are not supported")
    for key, kind_ in (("r", int), ("lora_alpha", (int, float))):
        value = cfg.get(key)
        if not isinstance(value, kind_) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{cfg_path}: '{key}' must be a positive number, not {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise InputError(f"{cfg_path}: '{key}' must be an object")
    return cfg


def _load_peft(path: Path, scale: float, base: ModelReader) -> Adapter:
    from quantcli.digests import file_sha256

    cfg = _peft_config(path)
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise InputError(f"{path}: holds adapter_model.bin (a PyTorch pickle), which quantcli does not load",
                             hint="save the adapter with safe_serialization=True (the default in PEFT)")
        raise InputError(f"{weights}: no such file (a PEFT adapter directory holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    names = _BaseNames(base)
    r0, alpha0, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    pairs: dict[str, dict[str, str]] = {}
    with open_model(weights) as reader:
        for key in reader.tensors:
            m = _PEFT_KEY.fullmatch(key)
            if m is None:
                raise InputError(f"{weights}: tensor '{key}' is not a LoRA A/B matrix"
                                 + (" (modules_to_save weights cannot be merged)" if "modules_to_save" in key else ""))
            pairs.setdefault(m["module"], {})[m["kind"]] = key
        deltas: dict[str, list[Delta]] = {}
        used_ranks: set[int] = set()
        for module, kinds in sorted(pairs.items()):
            embedding = "embedding_A" in kinds or "embedding_B" in kinds
            a_key, b_key = kinds.get("embedding_A" if embedding else "A"), kinds.get("embedding_B" if embedding else "B")
            if a_key is None or b_key is None:
                raise InputError(f"{weights}: module '{module}' has lora_{'A' if a_key is None else 'B'} missing")
            target = names.find(module)
            if target is None:
                raise InputError(f"{weights}: module '{module}' is not in the base {base.path} "
                                 f"(no tensor {names.describe(module)})", hint="is this adapter for another model?")
            a, b = _finite(reader, a_key, weights), _finite(reader, b_key, weights)
            r = _pattern_value(ranks, module, r0)
            alpha = float(_pattern_value(alphas, module, alpha0))
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise InputError(f"{weights}: {module}: lora_A {a.shape} and lora_B {b.shape} are not [r, in] and [out, r]")
            if a.shape[0] != int(r):
                raise InputError(f"{weights}: {module} has rank {a.shape[0]}, the config says r = {r}",
                                 hint="the adapter's config does not belong to its weights")
            if embedding:  # PEFT Embedding: delta = (B @ A)^T, [vocab, dim]
                left, right = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
            else:
                left, right = b, a
            left = names.to_base_rows(target, left)
            _check_shape(base, target, (left.shape[0], right.shape[1]), f"{weights}: {module}")
            factor = scale * alpha / (math.sqrt(r) if rslora else r)
            deltas.setdefault(target, []).append(Delta(left, right, factor))  # lm_head tied: the embedding's
            used_ranks.add(int(r))
    _check_targets(cfg, names, path)
    if not deltas:
        raise InputError(f"{weights}: no LoRA tensors")
    return Adapter(path, "peft", file_sha256(weights), scale, alpha0, tuple(sorted(used_ranks)), deltas)


def _check_targets(cfg: dict[str, Any], names: "_BaseNames", path: Path) -> None:
    """Every target module of the config must exist in the base (PEFT's own check when it wraps)."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    modules = names.modules()
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise InputError(f"{path / PEFT_CONFIG}: target_modules '{targets}' matches no module of the base")
        return
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        raise InputError(f"{path / PEFT_CONFIG}: target module(s) {', '.join(map(str, missing))} are not in the base",
                         hint="is this adapter for another architecture?")


def _finite(reader: ModelReader, name: str, path: Path) -> np.ndarray:
    x = reader.load_f32(name)
    if not np.isfinite(x).all():
        raise InputError(f"{path}: tensor '{name}' has NaN or Inf values")
    return np.ascontiguousarray(x, np.float32)


def _check_shape(base: ModelReader, target: str, shape: tuple[int, int], what: str) -> None:
    have = tuple(base.tensors[target].shape)
    if have == shape:
        return
    raise InputError(f"{what}: the update is {shape[0]}x{shape[1]} but {target} is "
                     f"{'x'.join(map(str, have))}", hint="is this adapter for another model size?")


def _load_gguf(path: Path, scale: float, base: ModelReader) -> Adapter:
    from quantcli.digests import file_sha256

    with open_model(path) as reader:
        if reader.format != "gguf":
            raise InputError(f"{path}: not a LoRA adapter (a PEFT directory or a llama.cpp GGUF adapter)")
        kind = reader.meta("general.type")
        if kind != "adapter":
            raise InputError(f"{path}: general.type is {kind!r}, not 'adapter': this is a model, not a LoRA adapter")
        if reader.meta("adapter.type") != "lora":
            raise InputError(f"{path}: adapter.type is {reader.meta('adapter.type')!r}; only 'lora' can be merged")
        if reader.meta("adapter.alora.invocation_tokens") is not None:
            raise InputError(f"{path}: an activated LoRA (aLoRA) applies only after its invocation tokens; "
                             "merging it into the weights would apply it everywhere")
        arch = reader.meta("general.architecture")
        if arch != base.architecture:
            raise InputError(f"{path}: adapter for {arch}, base {base.path} is {base.architecture}")
        alpha = float(reader.meta("adapter.lora.alpha", 0.0) or 0.0)
        pairs: dict[str, dict[str, str]] = {}
        for name in reader.tensors:
            if name.endswith((".lora_a", ".lora_b")):
                pairs.setdefault(name[:-7], {})[name[-1]] = name
            elif not name.endswith("_norm.weight"):  # llama.cpp skips norms (llama_adapter_lora_init)
                raise InputError(f"{path}: LoRA tensor '{name}' has an unexpected suffix")
        deltas: dict[str, list[Delta]] = {}
        ranks: set[int] = set()
        for target, kinds in sorted(pairs.items()):
            if set(kinds) != {"a", "b"}:
                raise InputError(f"{path}: {target} has lora_{'a' if 'a' not in kinds else 'b'} missing")
            if target not in base.tensors:
                raise InputError(f"{path}: {target} is not in the base {base.path}",
                                 hint="is this adapter for another model?")
            a, b = _finite(reader, kinds["a"], path), _finite(reader, kinds["b"], path)
            if target == "token_embd.weight":  # flipped: a [vocab, r], b [dim, r]; delta = a @ b^T
                left, right, rank = a, np.ascontiguousarray(b.T), b.shape[1]
            else:  # a [r, in], b [out, r]
                if a.shape[0] != b.shape[1]:
                    raise InputError(f"{path}: {target}: lora_a {a.shape} and lora_b {b.shape} do not share a rank")
                left, right, rank = b, a, b.shape[1]
            _check_shape(base, target, (left.shape[0], right.shape[1]), f"{path}: {target}")
            factor = scale * alpha / rank if alpha else scale  # llama_adapter_lora_weight::get_scale
            deltas[target] = [Delta(left, right, factor)]
            ranks.add(int(rank))
    if not deltas:
        raise InputError(f"{path}: no LoRA tensors")
    return Adapter(path, "gguf", file_sha256(path), scale, alpha, tuple(sorted(ranks)), deltas)


class _BaseNames:
    """Hugging Face module names -> the base's tensors (HF-named, or GGUF-shaped via HFLayout)."""

    def __init__(self, base: ModelReader) -> None:
        self.base = base
        self.layout = None
        self.hf_to_base: dict[str, str] = {}
        if any(n.startswith("blk.") or n == "token_embd.weight" for n in base.tensors):
            from quantcli.convert.to_hf import HFLayout

            try:
                self.layout = HFLayout.of(base)
            except InputError as exc:
                raise InputError(f"{exc.message}; a PEFT adapter can be merged into llama, qwen2, qwen3 and gemma3 "
                                 "GGUF models, or into a safetensors base that keeps Hugging Face names") from None
            for name in base.tensors:
                try:
                    hf = self.layout.name(name)
                except InputError:
                    continue
                if hf is not None:
                    self.hf_to_base[hf] = name
            if "output.weight" not in base.tensors:  # tied head: lm_head is the embedding
                self.hf_to_base.setdefault("lm_head.weight", "token_embd.weight")
        else:
            self.hf_to_base = {n: n for n in base.tensors}

    def _candidates(self, module: str) -> list[str]:
        forms = [module, module.replace("language_model.", ""), "model." + module,
                 module.removeprefix("model.")]
        return [f + ".weight" for f in dict.fromkeys(forms)]

    def find(self, module: str) -> str | None:
        return next((self.hf_to_base[c] for c in self._candidates(module) if c in self.hf_to_base), None)

    def describe(self, module: str) -> str:
        return " or ".join(self._candidates(module)[:2])

    def modules(self) -> list[str]:
        return [n.removesuffix(".weight") for n in self.hf_to_base if n.endswith(".weight")]

    def to_base_rows(self, target: str, left: np.ndarray) -> np.ndarray:
        """The update's rows in the base's order: llama's q/k permuted as the converter permutes them
        (gguf[r] = hf[idx[r]]), Gemma's embedding cut to the rows the converter keeps."""
        if self.layout is None:
            return left
        from quantcli.convert.models import Permute

        hf = self.layout.name(target) or ""
        heads = self.layout._permuted_heads(hf)
        if heads:
            Permute(heads).shape(left.shape)
            left = left[Permute(heads).rows(left.shape[0])]
        rows = self.base.tensors[target].shape[0]
        if left.shape[0] > rows and target == "token_embd.weight":
            left = left[:rows]
        return np.ascontiguousarray(left)


# -- the merged model ------------------------------------------------------------------------------


class MergedView(ModelReader):
    """`base` with its adapters' updates added: each updated tensor reads as F32, computed from the
    base's rows when asked for (`load_rows` / `raw_rows` of a slice cost only that slice)."""

    def __init__(self, base: ModelReader, adapters: list[Adapter], allow_requantize: bool = False) -> None:
        super().__init__(base.path)
        self.base, self.adapters = base, adapters
        self.format = base.format
        self.kv = base.kv
        self.deltas: dict[str, list[Delta]] = {}
        for adapter in adapters:
            for name, ds in adapter.deltas.items():
                self.deltas.setdefault(name, []).extend(ds)
        self.tensors = dict(base.tensors)
        for name in self.deltas:
            info = base.tensors[name]
            if info.dtype not in FLOAT_TYPES and not allow_requantize:
                raise UsageError(f"{base.path}: {name} is stored as {info.dtype}: merging a LoRA into a quantized "
                                 "base decodes it, and quantizing again loses more",
                                 hint="pass --allow-requantize to accept that, or merge into the F16/BF16/F32 base")
            n = info.n_params
            self.tensors[name] = TensorInfo(name, info.shape, "F32", GGMLQuantizationType.F32, 4 * n, 0)
        self._cache: tuple[str, np.ndarray] | None = None  # the last tensor merged whole

    def close(self) -> None:
        self.base.close()

    def __getattr__(self, name: str) -> Any:  # what else the base reader offers (alignment, _files, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def merged_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """float32 rows [start, stop) of W + sum of the updates."""
        info = self.base.tensors[name]
        cols = info.shape[-1] if info.shape else 1
        w = np.array(self.base.load_rows(name, start, stop), dtype=np.float32).reshape(stop - start, cols)
        for delta in self.deltas[name]:
            delta.add_to(w, start)
        return w

    def raw(self, name: str) -> np.ndarray:
        if name not in self.deltas:
            return self.base.raw(name)
        if self._cache is None or self._cache[0] != name:
            rows = self.base.tensors[name].shape[0] if self.base.tensors[name].shape else 1
            merged = self.merged_rows(name, 0, rows).reshape(-1).view(np.uint8)
            merged.flags.writeable = False
            self._cache = (name, merged)
        return self._cache[1]

    def raw_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if name not in self.deltas:
            return self.base.raw_rows(name, start, stop, out)
        return self.merged_rows(name, start, stop).reshape(-1).view(np.uint8)

    def load_f32(self, name: str, copy: bool = True) -> np.ndarray:
        if name not in self.deltas:
            return self.base.load_f32(name, copy)
        return self.raw(name).view("<f4").reshape(self.tensors[name].shape).copy()

    def load_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if name not in self.deltas:
            return self.base.load_rows(name, start, stop, out)
        return self.merged_rows(name, start, stop)

    def release(self, name: str) -> None:
        self.base.release(name)
        if self._cache is not None and self._cache[0] == name:
            self._cache = None

    def provenance(self) -> list[dict[str, Any]]:
        return [a.provenance() for a in self.adapters]


def merged(base: ModelReader, specs: list[AdapterSpec], allow_requantize: bool = False,
           warn: Callable[[str], None] | None = None) -> MergedView:
    """`base` with the adapters of `specs` merged (see the module docstring)."""
    adapters = [load_adapter(s, base) for s in specs]
    seen: dict[str, Path] = {}
    for a in adapters:
        if a.sha256 in seen and warn is not None:
            warn(f"{a.path} is the same adapter as {seen[a.sha256]}: it is merged twice")
        seen.setdefault(a.sha256, a.path)
    return MergedView(base, adapters, allow_requantize)
