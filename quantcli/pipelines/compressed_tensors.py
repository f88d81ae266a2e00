"""A GGUF-shaped model as a Hugging Face directory in compressed-tensors' format, which vLLM and
transformers load: W8A8 int8 (`int-quantized`, vLLM's `CompressedTensorsW8A8Int8`) or W4A16
(`pack-quantized`, vLLM's `CompressedTensorsWNA16`).

    result = write_compressed_tensors(reader, Path("out"), linears=["blk.0.attn_q.weight", ...])
    result = write_compressed_tensors(reader, Path("out"), linears=[...], scheme="W4A16")

With scheme="W4A16" each chosen linear is stored as the SYM4_B64 codec (codecs/sym4.py, spec/001)
computes it: `weight_packed` int32 [out, in/8] (eight 4-bit values per word, value + 8, the first in
the lowest bits: compressed-tensors' `pack_to_int32`), `weight_scale` float32 [out, in/64]
(max|x|/7 of each group of 64 along the row) and `weight_shape` int64 [2]; `quantization_config`
is compressed-tensors' W4A16 preset with group_size 64 (num_bits 4, symmetric, strategy group,
no activation quantization). Rows must split into groups of 64. The scales stay float32 so that
decompressing gives the codec's values exactly; vLLM casts them to the model's dtype when it loads.

What the W8A8 directory holds:

- every chosen block linear as `weight` int8 [out, in] (symmetric, per output channel,
  round half to even, -127..127: `engine.w8a8.quantize_weight`, so vLLM multiplies by exactly the
  values `report --simulate w8a8` simulated) and `weight_scale` float32 [out, 1], the shapes
  compressed-tensors writes and vLLM's CompressedTensorsW8A8Int8 allocates; with static activations
  also `input_scale` float32 [1] = max|x| / 127 of the calibration. vLLM fuses q/k/v and gate/up
  into one matmul with one input scale, so each of those groups gets the largest of its maxima.
  "hybrid" activations are static for every linear but ffn_down (`engine.w8a8.DYNAMIC_IN_HYBRID`),
  dynamic per token there: two config groups whose targets are regexes of the module names'
  last parts (`re:.*[.](q_proj|k_proj|...)$`, `re:.*[.](down_proj)$`), so no module matches both
  and vLLM's and compressed-tensors' matching agree; only the static ones have `input_scale`;
- everything else under its HF name (`convert.to_hf`: names, q/k row order, Gemma's norm offset)
  in the dtype it is stored in, F32, F16 or BF16; a tensor stored in a quantized GGML type
  (Q8_0, Q4_K, ...) is decoded and written F16 (the result lists them in its warnings);
- `model.safetensors`, or shards of at most `shard_bytes` (a larger tensor alone) named
  `model-00001-of-0000N.safetensors` with `model.safetensors.index.json`; `metadata` goes into
  every header's `__metadata__`, with "format": "pt" (transformers refuses other files);
- `config.json`: the source's own (an HF directory) or one made from the GGUF metadata, plus
  `quantization_config` as compressed-tensors 0.20.1's `ModelCompressor.update_config` writes it
  for its W8A8 preset (`ignore`: lm_head and every block linear not chosen). With no linear
  chosen the directory is a plain checkpoint without `quantization_config`;
- the tokenizer files of `tokenizer_dir`; without it none (a warning says so).

The directory is built beside `out_dir` under a temporary name and renamed into place at the end:
after an error or an interrupt nothing is left, and an existing `out_dir` is replaced only with
`force` (and never when it holds an input).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from quantcli.codecs import sym4
from quantcli.convert.to_hf import HFLayout, block_linear, hf_config, stored_dtype
from quantcli.engine.w8a8 import ACTIVATION_MODES, QMAX, mode_of, quantize_weight
from quantcli.errors import InputError, NumericError, OutputError, UsageError
from quantcli.formats import TensorSpec, create_writer
from quantcli.formats.atomic import atomic_write, describe, fsync_dir
from quantcli.formats.dtypes import SAFETENSORS_DTYPES
from quantcli.formats.safetensors import INDEX_NAME, SINGLE_NAME
from quantcli.pipelines.common import Progress, ProgressFn, progress_or_noop

SCHEMES = ("W8A8", "W4A16")
GROUP = 64  # W4A16's group size: the SYM4_B64 block
SCHEMA_VERSION = "0.20.1"  # the compressed-tensors release whose config.json layout this writes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "added_tokens.json", "vocab.json",
                   "merges.txt")
# linears vLLM runs as one matmul (QKVParallelLinear, MergedColumnParallelLinear): one input scale,
# and all or none of them quantized (vLLM refuses a fused layer with mixed schemes)
FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


def fused_group(name: str) -> list[str]:
    """The GGUF names vLLM runs as one matmul with block linear `name` (itself included): q/k/v
    and gate/up of a layer share one scheme, so they are quantized, or left out, together."""
    layer, kind = block_linear(name)  # type: ignore[misc]
    return [f"blk.{layer}.{k}.weight" for k in next((g for g in FUSED if kind in g), (kind,))]


def with_fused(names: Iterable[str]) -> set[str]:
    """`names` (GGUF block linears) with the rest of each one's fused group (`fused_group`)."""
    return {m for name in names for m in fused_group(name)}


@dataclass(frozen=True)
class CTResult:
    out_dir: Path
    files: tuple[str, ...]  # written into out_dir, in order
    n_quantized: int  # block linears stored int8 (W8A8) or int4 (W4A16)
    bytes: int  # of all the files
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Job:
    """One source tensor and the HF tensors it becomes (weight; or weight, weight_scale, input_scale)."""

    source: str  # GGUF name
    specs: tuple[TensorSpec, ...]
    quantized: bool

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(s) for s in self.specs)


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * SAFETENSORS_DTYPES[spec.type][1]


def config_of_source(reader: Any) -> dict | None:
    """The source directory's config.json of a Hugging Face model read through the converter view
    (`reader.source.config`); None for a GGUF source (the config is then made from its metadata)."""
    return getattr(getattr(reader, "source", None), "config", None) or None


def quantization_config(activations: str, ignore: list[str], scheme: str = "W8A8",
                        modules: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """config.json's `quantization_config`: for int8 W8A8, weights per channel and activations per
    token and dynamic, or (static) one scale per tensor from calibration, or (hybrid) each module
    as `modules` says ({"tensor": static module names, "token": dynamic ones}: one config group
    each, targeted by the names' last parts); for W4A16, weights int4 symmetric in groups of 64
    and activations as they are."""

    def args(strategy: str, dynamic: bool, bits: int = 8, group: int | None = None) -> dict[str, Any]:
        return {"num_bits": bits, "type": "int", "symmetric": True, "group_size": group, "strategy": strategy,
                "dynamic": dynamic}

    def group(targets: list[str], weights: dict[str, Any], inputs: dict[str, Any] | None) -> dict[str, Any]:
        return {"targets": targets, "weights": weights, "input_activations": inputs, "output_activations": None,
                "format": None}

    if scheme == "W4A16":
        groups = {"group_0": group(["Linear"], args("group", False, 4, GROUP), None)}
        fmt = "pack-quantized"
    elif activations == "hybrid":
        if modules is None:
            raise UsageError("hybrid activations need the modules of each scheme")
        groups, fmt = {}, "int-quantized"
        for mode, dynamic in (("tensor", False), ("token", True)):
            leaves = sorted({m.rsplit(".", 1)[-1] for m in modules.get(mode, ())})
            if leaves:
                groups[f"group_{len(groups)}"] = group(["re:.*[.](" + "|".join(leaves) + ")$"],
                                                       args("channel", False), args(mode, dynamic))
    else:
        static = activations == "static"
        inputs = args("tensor", False) if static else args("token", True)
        groups, fmt = {"group_0": group(["Linear"], args("channel", False), inputs)}, "int-quantized"
    return {
        "config_groups": groups,
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": SCHEMA_VERSION,
    }


def write_compressed_tensors(reader: Any, out_dir: Path, *, linears: Iterable[str], activations: str = "dynamic",
                             input_max: Mapping[str, float] | None = None, source_config: dict | None = None,
                             tokenizer_dir: Path | None = None, metadata: Mapping[str, str] | None = None,
                             force: bool = False, progress: ProgressFn | None = None,
                             shard_bytes: int = 5 * 2**30, scheme: str = "W8A8",
                             int8: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> CTResult:
    """Write `reader`'s model to `out_dir` (see the module's docstring). `linears`: GGUF names of the
    block linears to quantize; `input_max`: max|x| of each one's input (W8A8 static activations only);
    `source_config`: the source directory's config.json (None: made from the GGUF metadata);
    `int8`: W8A8 weights already rounded (GGUF name -> (q int8 [out, in], scale float32 [out]), GGUF
    row order; calibrate/gptq.py), written as they are instead of rounding the reader's to nearest."""
    step = progress_or_noop(progress)
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme '{scheme}'; known: {', '.join(SCHEMES)}")
    if activations not in ACTIVATION_MODES:
        raise UsageError(f"unknown activation scheme '{activations}'; known: {', '.join(ACTIVATION_MODES)}")
    if scheme == "W4A16" and activations != "dynamic":
        raise UsageError("W4A16 quantizes no activations: static activation scales belong to W8A8")
    # the linears whose input has a static scale ("static": all; "hybrid": all but ffn_down)
    if shard_bytes <= 0:
        raise UsageError(f"shard_bytes must be positive, not {shard_bytes}")
    out = Path(out_dir)
    chosen = _check_linears(reader, linears, scheme)
    static = {n for n in chosen if mode_of(ACTIVATION_MODES[activations], n) == "tensor"}
    scales = _input_scales(static, input_max) if static else {}
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise InputError(f"{tokenizer_dir}: no such tokenizer directory")
    check_output_dir(out, [Path(reader.path)] + ([Path(tokenizer_dir)] if tokenizer_dir is not None else []), force)

    config = copy.deepcopy(dict(source_config)) if source_config is not None else hf_config(reader)
    config.pop("quantization_config", None)
    layout = HFLayout.of(reader, config)
    jobs = _plan(reader, layout, chosen, static=static, scheme=scheme)
    if chosen:
        ignore = ["lm_head"] + [layout.module(n) for n in reader.tensors
                                if block_linear(n) is not None and n not in chosen]
        modules = {"tensor": [layout.module(n) for n in sorted(static)],
                   "token": [layout.module(n) for n in sorted(chosen - static)]}
        config["quantization_config"] = quantization_config(activations, ignore, scheme, modules)
    warnings = _decoded_warning(reader, jobs)

    tmp = _temp_dir(out)
    try:
        files = _write_weights(reader, layout, jobs, scales, tmp, metadata or {}, shard_bytes, step, int8 or {})
        _write_json(tmp / "config.json", config)
        files.append("config.json")
        copied, why = _copy_tokenizer(reader, tokenizer_dir, tmp)
        files += copied
        if why:
            warnings.append(f"no tokenizer written: {why}; copy tokenizer.json or tokenizer.model into "
                            f"{out} before loading it with transformers or vLLM")
        size = sum((tmp / f).stat().st_size for f in files)
        _publish_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{out}: write failed: {describe(exc)}") from None
        raise
    return CTResult(out, tuple(files), len(chosen), size, tuple(warnings))


# -- checks --------------------------------------------------------------------------------------


def _check_linears(reader: Any, linears: Iterable[str], scheme: str = "W8A8") -> set[str]:
    """The chosen block linears, after checking that vLLM can run them as chosen."""
    chosen = set(linears)
    what = "int4" if scheme == "W4A16" else "int8"
    for name in sorted(chosen):
        if name not in reader.tensors:
            raise UsageError(f"{reader.path}: no tensor named '{name}' to store as {what}")
        if block_linear(name) is None or len(reader.tensors[name].shape) != 2:
            raise UsageError(f"'{name}' cannot be stored as {what}: only block linears' weights can "
                             "(blk.N.attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/ffn_down.weight); "
                             "the output head and the embeddings stay as they are")
        if scheme == "W4A16" and reader.tensors[name].shape[1] % GROUP:
            raise UsageError(f"'{name}' has rows of {reader.tensors[name].shape[1]} values, which do not split "
                             f"into W4A16's groups of {GROUP}", hint="leave it out of the quantized linears")
    for name in sorted(chosen):
        group = fused_group(name)
        left = [m for m in group if m in reader.tensors and m not in chosen]
        if left:
            raise UsageError(f"{name} is chosen for {what} but {', '.join(left)} is not: vLLM runs "
                             f"{' + '.join(g.split('.')[2] for g in group)} of a layer as one matmul with one scheme",
                             hint="quantize all of them or none")
    return chosen


def _input_scales(chosen: set[str], input_max: Mapping[str, float] | None) -> dict[str, np.float32]:
    """Static input scales: max|x| / 127 as float32 (engine.w8a8.quantize_per_tensor's scale), the
    largest of a fused group's for each of its members."""
    if input_max is None:
        raise UsageError("static activations need input_max (weight name -> max|x| of its input); "
                         "gather it with the absmax observer, or use activations='dynamic'")
    missing = sorted(n for n in chosen if n not in input_max)
    if missing:
        raise UsageError(f"input_max has no max|x| for {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""),
                         hint="the activation maxima are of another model or another choice of linears")
    for name in sorted(chosen):
        amax = float(input_max[name])
        if not np.isfinite(amax) or amax <= 0:
            raise NumericError(f"input_max[{name}] is {amax}: a static scale needs a finite max|x| > 0")
    scales = {}
    for name in chosen:
        amax = max(float(input_max[m]) for m in fused_group(name) if m in chosen)
        scales[name] = np.float32(np.float32(amax) / np.float32(QMAX))
    return scales


def check_output_dir(out: Path, inputs: list[Path], force: bool) -> None:
    """An output directory's check_output: its parent exists, it is not a file, it holds no
    input, and an existing one is replaced only with force."""
    if not out.parent.is_dir():
        raise OutputError(f"{out}: directory {out.parent} does not exist")
    target = out.resolve()
    for src in inputs:
        src = src.resolve()
        if src == target or target in src.parents:
            raise OutputError(f"{out}: holds the input {src}; write the output elsewhere")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory")
        if not force:
            raise OutputError(f"{out}: already exists", hint="pass --force to replace it")


# -- the plan ------------------------------------------------------------------------------------


def _plan(reader: Any, layout: HFLayout, chosen: set[str], static: set[str], scheme: str = "W8A8") -> list[_Job]:
    """What each source tensor becomes; `static`: the chosen linears with an input_scale."""
    jobs = []
    for name, info in reader.tensors.items():
        hf = layout.name(name)
        if hf is None:
            continue
        if name in chosen and scheme == "W4A16":
            module, (n_out, n_in) = layout.module(name), info.shape
            specs = [TensorSpec(f"{module}.weight_packed", (n_out, n_in // 8), "I32"),
                     TensorSpec(f"{module}.weight_scale", (n_out, n_in // GROUP), "F32"),
                     TensorSpec(f"{module}.weight_shape", (2,), "I64")]
            jobs.append(_Job(name, tuple(specs), True))
        elif name in chosen:
            module, (n_out, n_in) = layout.module(name), info.shape
            specs = [TensorSpec(f"{module}.weight", (n_out, n_in), "I8"),
                     TensorSpec(f"{module}.weight_scale", (n_out, 1), "F32")]
            if name in static:
                specs.append(TensorSpec(f"{module}.input_scale", (1,), "F32"))
            jobs.append(_Job(name, tuple(specs), True))
        else:
            shape = layout.shape(name, tuple(info.shape))
            jobs.append(_Job(name, (TensorSpec(hf, shape, stored_dtype(info.dtype)),), False))
    return jobs


def _decoded_warning(reader: Any, jobs: list[_Job]) -> list[str]:
    decoded = [j.source for j in jobs if not j.quantized and reader.tensors[j.source].dtype != j.specs[0].type]
    if not decoded:
        return []
    kinds = sorted({reader.tensors[n].dtype for n in decoded})
    return [f"{len(decoded)} tensors stored as {', '.join(kinds)} (e.g. {decoded[0]}) were decoded and "
            "written as F16"]


def _shards(jobs: list[_Job], limit: int) -> list[list[_Job]]:
    """Consecutive runs of jobs of at most `limit` bytes (a larger job alone), as transformers shards."""
    shards: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


# -- writing -------------------------------------------------------------------------------------


def _write_weights(reader: Any, layout: HFLayout, jobs: list[_Job], scales: Mapping[str, np.float32],
                   tmp: Path, metadata: Mapping[str, str], shard_bytes: int, step: ProgressFn,
                   int8: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    shards = _shards(jobs, shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(len(shards))]
    header = {**metadata, "format": "pt"}
    total, done, n = sum(j.nbytes for j in jobs), 0, 0
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        specs = [s for job in shard for s in job.specs]
        with create_writer("safetensors", tmp / fname, header, specs) as writer:
            for job in shard:
                for name, data in _tensors(reader, layout, job, scales, int8.get(job.source)):
                    writer.write(name, data)
                    weight_map[name] = fname
                done, n = done + job.nbytes, n + 1
                step(Progress("tensor", n, len(jobs), job.source, done, total))
            writer.finish()
    if len(shards) == 1:
        return names
    _write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return names + [INDEX_NAME]


def _tensors(reader: Any, layout: HFLayout, job: _Job, scales: Mapping[str, np.float32],
             rounded: tuple[np.ndarray, np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, data) of one job's tensors, in its specs' order; `rounded`: the job's int8 weight
    and scales as given (GGUF rows), for a W8A8 linear."""
    packed = job.specs[0].name.endswith(".weight_packed")
    if rounded is not None and job.quantized and not packed:
        q = layout.to_hf(job.source, rounded[0]).astype(np.int8)  # small integers: exact in float32
        scale = layout.to_hf(job.source, np.asarray(rounded[1], np.float32).reshape(-1, 1))
    else:
        x = layout.to_hf(job.source, reader.load_f32(job.source))
        if not job.quantized:
            spec = job.specs[0]
            yield spec.name, _cast(x, spec.type, job.source)
            return
        if not np.isfinite(x).all():
            raise NumericError(f"{job.source}: NaN or Inf weights cannot be quantized")
        if packed:  # W4A16: the SYM4_B64 codec's values
            q4, scale4 = sym4.quantize_values(x)  # [out, in] int8 in [-7, 7], [out, in/64] float32
            yield job.specs[0].name, sym4.pack_nibbles(q4).view("<i4")  # [out, in/8]
            yield job.specs[1].name, scale4
            yield job.specs[2].name, np.array(x.shape, np.int64)
            return
        q, scale = quantize_weight(x)  # [out, in] int8, [out] float32
    yield job.specs[0].name, q
    yield job.specs[1].name, scale.reshape(-1, 1)
    if len(job.specs) == 3:
        yield job.specs[2].name, np.array([scales[job.source]], np.float32)


def _cast(x: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """float32 values in the stored dtype (BF16 rounded to nearest even, as the converter rounds)."""
    if dtype == "F32":
        return x
    if dtype == "BF16":
        return gguf.quants.quantize(x, GGMLQuantizationType.BF16)
    out = x.astype(np.float16)
    if not np.isfinite(out).all() and np.isfinite(x).all():
        raise NumericError(f"{name}: values beyond float16's range (max |x| {float(np.abs(x).max()):g})")
    return out


def _write_json(path: Path, obj: Any) -> None:
    """As transformers and compressed-tensors write config.json: indent 2, keys sorted."""
    with atomic_write(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n")


def _copy_tokenizer(reader: Any, tokenizer_dir: Path | None, tmp: Path) -> tuple[list[str], str | None]:
    """The tokenizer files copied, and why there are none (None: some were copied)."""
    if tokenizer_dir is None:
        source = "a GGUF file" if Path(reader.path).is_file() else "a directory"
        return [], f"the source is {source} and no tokenizer directory was given"
    copied = []
    for fname in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / fname
        if not src.is_file():
            continue
        try:
            fh = open(src, "rb")
        except OSError as exc:
            raise InputError(f"{src}: cannot read: {describe(exc)}") from None
        with fh, atomic_write(tmp / fname) as dst:
            shutil.copyfileobj(fh, dst, 16 << 20)
        copied.append(fname)
    return copied, None if copied else f"{tokenizer_dir} holds none of {', '.join(TOKENIZER_FILES)}"


def _temp_dir(out: Path) -> Path:
    """A new directory beside `out` (`.NAME.tmp-XXXX`) with normal permissions."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot create a directory in {out.parent}: {describe(exc)}") from None
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700
    return tmp


def _publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory onto `out`; an existing `out` (force) is first moved aside into
    a fresh `.NAME.old-XXXX` and removed once the new one is in place (put back if that fails)."""
    fsync_dir(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
