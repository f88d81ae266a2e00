"""A Hugging Face checkpoint seen as the GGUF llama.cpp's converter would write from it.

Names, shapes and metadata are worked out up front from the safetensors headers, config.json and
the tokenizer files; tensor data is read one tensor at a time from the memory-mapped shards and
changed (q/k permutation, Gemma's norm offset, trimmed embedding rows) only when it is asked for.

Numbers follow `TextModel.prepare_tensors`: F32 and F16 tensors are changed in their own dtype,
anything else (BF16) is first widened to F32, exactly as the converter's torch code does, so
`load_f32` returns the values the converter writes with `--outtype f32` and `raw` the bytes it
writes when the output type equals the source dtype.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from quantcli.convert.hparams import converter_hparams
from quantcli.convert.models import Converter, TensorPlan, converter_for
from quantcli.errors import InputError
from quantcli.formats.base import KV, ModelReader, TensorInfo

_STORED = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_BLOCK_BYTES = 16 << 20  # rows decoded at a time: 16 MiB of float32
_ARRAY_ITEM = {GGUFValueType.INT32: np.int32, GGUFValueType.FLOAT32: np.float32,
               GGUFValueType.UINT32: np.uint32, GGUFValueType.INT64: np.int64,
               GGUFValueType.BOOL: np.bool_}


class _MetadataSink(gguf.GGUFWriter):
    """gguf's writer used only for its add_* methods: it collects key/values and writes nothing."""

    def __init__(self, arch: str) -> None:
        super().__init__(path=None, arch=arch)

    def add_key_value(self, key: str, val: Any, vtype: GGUFValueType,
                      sub_type: GGUFValueType | None = None) -> None:
        self.kv_data[0][key] = gguf.GGUFValue(value=val, type=vtype, sub_type=sub_type)  # last one wins

    def to_kv(self) -> dict[str, KV]:
        return {key: _to_kv(v) for key, v in self.kv_data[0].items()}


def _to_kv(v: gguf.GGUFValue) -> KV:
    if v.type == GGUFValueType.STRING:
        text = v.value.decode("utf-8", errors="surrogateescape") if isinstance(v.value, (bytes, bytearray)) else v.value
        return KV(v.type, text)
    if v.type != GGUFValueType.ARRAY:
        return KV(v.type, v.value.item() if isinstance(v.value, np.generic) else v.value)
    items = list(v.value)
    item_type = v.sub_type if v.sub_type is not None else GGUFValueType.get_type(items[0])
    if item_type == GGUFValueType.STRING:
        return KV(v.type, [s.decode("utf-8", errors="surrogateescape") if isinstance(s, (bytes, bytearray))
                           else s for s in items], item_type)
    return KV(v.type, np.asarray(items, dtype=_ARRAY_ITEM[item_type]), item_type)


class HFModelView(ModelReader):
    """`hf_to_gguf_view(reader)`: GGUF names, shapes and metadata over a HF safetensors directory."""

    format = "hf"

    _cache: np.ndarray | None = None
    _cache_key: tuple[str, str] | None = None

    def __init__(self, source: ModelReader) -> None:
        super().__init__(source.path)
        self.source = source
        self._files = getattr(source, "_files", {})  # what pipelines hash as the source
        try:
            self._setup()
        except BaseException:
            source.close()
            raise

    def _setup(self) -> None:
        config = getattr(self.source, "config", None)
        if not config:
            raise InputError(f"{self.path}: no config.json: not a Hugging Face model directory")
        self.hparams = converter_hparams(config)
        quant = self.hparams.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method"):
            raise InputError(f"{self.path}: pre-quantized checkpoint ({quant['quant_method']}) is not supported",
                             hint="start from the unquantized (F32/F16/BF16) checkpoint")
        self.converter: Converter = converter_for(self.path, self.hparams)
        self._plans: dict[str, TensorPlan] = {}
        self._extra: dict[str, np.ndarray] = {}
        self._plan_tensors()
        self.kv = self._metadata()

    # -- tensors ---------------------------------------------------------------------------------

    def _plan_tensors(self) -> None:
        for name, data in self.converter.extra_tensors():
            self._extra[name] = data
            self._add(TensorPlan(name, None), TensorInfo(name, data.shape, "F32", GGMLQuantizationType.F32,
                                                         data.nbytes, 0))
        by_file: dict[str, list[TensorInfo]] = {}
        for info in self.source.tensors.values():
            by_file.setdefault(self._file_of(info.name), []).append(info)
        for fname in sorted(by_file):  # the converter: shards in name order, tensors in name order
            for info in sorted(by_file[fname], key=lambda i: i.name):
                plan = self.converter.plan_tensor(info.name, info.shape)
                if plan is None:
                    continue
                if info.dtype not in _STORED:
                    raise InputError(f"{self.path}: tensor '{info.name}' is {info.dtype}; only F32, F16 "
                                     "and BF16 checkpoints are supported")
                shape = info.shape
                for op in plan.ops:
                    shape = op.shape(shape)
                n = int(np.prod(shape, dtype=np.int64)) if shape else 1
                out = TensorInfo(plan.name, tuple(shape), info.dtype, info.ggml_type,
                                 n * (4 if info.dtype == "F32" else 2), info.offset)
                self._add(plan, out)

    def _add(self, plan: TensorPlan, info: TensorInfo) -> None:
        if plan.name in self.tensors:
            raise InputError(f"{self.path}: two tensors map to '{plan.name}' "
                             f"('{self._plans[plan.name].source}' and '{plan.source}')")
        self._plans[plan.name] = plan
        self.tensors[plan.name] = info

    def _file_of(self, name: str) -> str:
        owner = getattr(self.source, "_owner", {}).get(name)
        return owner.path.name if owner is not None else ""

    def _materialize(self, name: str, out_dtype: str) -> np.ndarray:
        """The changed tensor as float32 (`out_dtype` "F32") or in its source dtype, built a block of
        rows at a time so memory holds the result plus one block, never a second full copy."""
        plan = self._plans[name]
        info = self.tensors[name]
        if plan.source is None:
            return self._extra[name].astype(np.float32)
        src = self.source.info(plan.source)
        rows = src.shape[0] if src.shape else 1
        stored = self.source.raw(plan.source).view(_STORED[src.dtype]).reshape(rows, -1)  # (rows, cols)
        index: np.ndarray | None = None
        for op in plan.ops:
            if not op.elementwise:
                step = op.rows(rows if index is None else len(index))
                index = step if index is None else index[step]
        elementwise = [op for op in plan.ops if op.elementwise]
        n_out = rows if index is None else len(index)
        out_np = np.float32 if out_dtype == "F32" else _STORED[src.dtype]
        out = np.empty((n_out, stored.shape[1]), dtype=out_np)
        per_block = max(1, _BLOCK_BYTES // max(1, 4 * stored.shape[1]))
        for start in range(0, n_out, per_block):
            stop = min(n_out, start + per_block)
            block = stored[start:stop] if index is None else stored[index[start:stop]]
            x = _working(block, src.dtype)
            for op in elementwise:
                x = op(x)
            if out_dtype == "BF16":  # float32 -> bfloat16 as the converter rounds it
                out[start:stop] = gguf.quants.quantize(x, GGMLQuantizationType.BF16).view(np.uint16)
            else:
                out[start:stop] = x
        return out.reshape(info.shape)

    def raw(self, name: str) -> np.ndarray:
        """The bytes the converter writes for this tensor when the output type is its source dtype
        (the checkpoint's own bytes, memory-mapped, when nothing changes them)."""
        info = self.info(name)
        plan = self._plans[name]
        if plan.source is not None and not plan.ops:
            return self.source.raw(plan.source)
        return self._materialize(name, info.dtype).reshape(-1).view(np.uint8)

    def load_f32(self, name: str) -> np.ndarray:
        self.info(name)
        return self._materialize(name, "F32")

    # Slices of rows (what quantize streams): untouched tensors come straight from the checkpoint;
    # a changed tensor is built once and sliced until `release`.
    def raw_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        plan = self._plans[self.info(name).name]
        if plan.source is not None and not plan.ops:
            return self.source.raw_rows(plan.source, start, stop, out)
        return self._built(name, "raw")[start:stop].reshape(-1).view(np.uint8)

    def load_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        plan = self._plans[self.info(name).name]
        if plan.source is not None and not plan.ops:
            return self.source.load_rows(plan.source, start, stop, out)
        return self._built(name, "F32")[start:stop]

    def _built(self, name: str, kind: str) -> np.ndarray:
        """The changed tensor as (rows, row length), kept while its slices are read."""
        if self._cache_key != (name, kind):
            self._cache = None  # drop the previous one before building the next
            info = self.info(name)
            cols = info.shape[-1] if info.shape else 1
            data = self._materialize(name, "F32" if kind == "F32" else info.dtype)
            self._cache, self._cache_key = data.reshape(-1, cols), (name, kind)
        return self._cache

    def release(self, name: str) -> None:
        plan = self._plans.get(name)
        if self._cache_key is not None and self._cache_key[0] == name:
            self._cache, self._cache_key = None, None
        if plan is not None and plan.source is not None:
            self.source.release(plan.source)

    def transforms(self, name: str) -> tuple:
        """The changes applied to a tensor on load (empty: its bytes are the checkpoint's)."""
        self.info(name)
        return self._plans[name].ops

    def source_name(self, name: str) -> str | None:
        """The checkpoint tensor a GGUF tensor comes from (None: generated from the config)."""
        self.info(name)
        return self._plans[name].source

    def close(self) -> None:
        self.source.close()

    # -- metadata --------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, KV]:
        """ModelBase.prepare_metadata, then TextModel.set_vocab, in the converter's order."""
        conv = self.converter
        gw = _MetadataSink(conv.arch_name)
        total = sum(info.n_params for info in self.tensors.values())
        meta = gguf.Metadata.load(None, self.path, None, total)
        gen_config = gguf.Metadata.load_generation_config(self.path)
        if gen_config and "penalty_repeat" not in gen_config and "repetition_penalty" in gen_config:
            meta.sampling_penalty_repeat = gen_config["repetition_penalty"]  # newer gguf-py reads it
        if meta.name is None:
            meta.name = self.path.name
        if meta.size_label is None and total > 0:
            meta.size_label = gguf.size_label(total, total, 0, 0)
        gw.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(gw)
        conv.set_gguf_parameters(gw)
        gw.add_quantization_version(gguf.GGML_QUANT_VERSION)
        conv.set_vocab(gw)
        return gw.to_kv()

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["source_format"] = self.source.format
        return out


def _working(block: np.ndarray, dtype: str) -> np.ndarray:
    """TextModel.prepare_tensors: F16 and F32 stay as they are, anything else is widened to F32."""
    if dtype == "BF16":
        out = block.astype(np.uint32)
        out <<= 16
        return out.view(np.float32)
    return block


def hf_to_gguf_view(reader: ModelReader) -> HFModelView:
    """A Hugging Face directory (config.json + safetensors + tokenizer) as llama.cpp's converter
    would turn it into GGUF: GGUF tensor names and metadata, tensors changed as it changes them."""
    return HFModelView(reader)
