"""quantcli.presets against llama-quantize itself.

- gemma3-270m: every tensor of the real model as llama-quantize typed it, for every preset file in
  tests/data/reference/gemma3-270m (with and without imatrix), plus general.file_type.
- oracle.json.gz: llama-quantize --dry-run on synthetic models (GQA Llama, 70B, 8-expert MoE, Falcon
  with fused qkv, tied 576-wide embeddings, odd shapes) x every preset x imatrix or not, plus option
  cases (--pure, overrides, --tensor-type); see tests/data/presets/make_oracle.py.
- unit tests for the rules, with the reason strings the dry-run table shows, and the errors.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from quantcli import presets
from quantcli.errors import InputError, UsageError
from quantcli.formats.base import KV
from quantcli.presets import PresetOptions, fallback_count, file_type, get_preset, plan

DATA = Path(__file__).resolve().parent / "data"
REF = DATA / "reference" / "gemma3-270m"


@dataclass(frozen=True)
class T:
    name: str
    shape: tuple[int, ...]
    dtype: str = "F32"


# -- gemma3-270m: the real model -------------------------------------------------------------------


@lru_cache(maxsize=None)
def gemma() -> tuple[list[T], dict]:
    base = json.loads((REF / "F32.json").read_text())
    tensors = [T(n, tuple(reversed(t["shape"])), t["type"]) for n, t in base["tensors"].items()]
    meta = json.loads((DATA / "gemma3-270m-meta.json").read_text())
    return tensors, meta


@pytest.mark.parametrize("path", sorted(REF.glob("*.json")), ids=lambda p: p.stem)
def test_gemma3_matches_llama_quantize(path: Path) -> None:
    ref = json.loads(path.read_text())
    tensors, meta = gemma()
    name = path.stem.removesuffix("_imatrix")
    choices = plan(tensors, meta, name, PresetOptions(has_imatrix=path.stem.endswith("_imatrix")))
    got = {c.name: c.type for c in choices}
    want = {n: t["type"] for n, t in ref["tensors"].items()}
    assert [c.name for c in choices] == [t.name for t in tensors]
    assert {n: t for n, t in got.items() if t != want[n]} == {}
    assert file_type(name, tensors, meta) == ref["file_type"]


def test_gemma3_q4_k_m_reasons_and_fallback_count() -> None:
    tensors, meta = gemma()
    by = {c.name: c for c in plan(tensors, meta, "Q4_K_M")}
    assert fallback_count(list(by.values())) == 90  # llama-quantize: "90 of 236 tensor(s) required fallback"
    assert by["blk.0.attn_v.weight"].reason == (
        "Q4_K_M: attn_v -> Q6_K (use_more_bits #0 of 18); fallback: 640 not divisible by 256 (Q6_K) -> Q8_0")
    assert by["blk.0.ffn_down.weight"].reason == "Q4_K_M: ffn_down -> Q6_K (use_more_bits layer 0 of 18)"
    assert by["blk.3.ffn_down.weight"].reason == "Q4_K_M: default Q4_K"
    assert by["token_embd.weight"].reason == "Q4_K_M: token_embd (tied output) -> Q8_0 (640 not divisible by 256)"
    assert by["blk.0.attn_norm.weight"].reason == "1-D: kept"
    assert by["blk.0.attn_norm.weight"].type == "F32"
    assert by["blk.0.attn_q.weight"].fallback and not by["blk.3.ffn_down.weight"].fallback


def test_gemma3_iq2_xxs_without_imatrix_raises_like_llama_quantize() -> None:
    tensors, meta = gemma()
    # llama-quantize: "offending tensor: blk.0.attn_output.weight, target type: iq2_xxs"
    with pytest.raises(UsageError, match="requires an importance matrix: tensor blk.0.attn_output.weight would be IQ2_XXS"):
        plan(tensors, meta, "IQ2_XXS")
    # --dry-run only warns; the choices say which tensors need it
    choices = plan(tensors, meta, "IQ2_XXS", PresetOptions(dry_run=True))
    assert {c.type for c in choices if c.requires_imatrix} == {"IQ2_XXS"}


# -- llama-quantize --dry-run on synthetic models --------------------------------------------------


@lru_cache(maxsize=None)
def oracle() -> dict:
    return json.loads(gzip.decompress((DATA / "presets" / "oracle.json.gz").read_bytes()))


def options_from(args: list[str]) -> PresetOptions:
    """llama-quantize flags -> PresetOptions (dry run: it only warns about the imatrix)."""
    kw: dict = {"dry_run": True}
    tensor_types = []
    it = iter(args)
    for a in it:
        if a == "--imatrix":
            kw["has_imatrix"] = True
        elif a == "--pure":
            kw["pure"] = True
        elif a == "--leave-output-tensor":
            kw["leave_output_tensor"] = True
        elif a == "--output-tensor-type":
            kw["output_tensor_type"] = next(it)
        elif a == "--token-embedding-type":
            kw["token_embedding_type"] = next(it)
        elif a == "--tensor-type":
            tensor_types.append(tuple(next(it).split("=", 1)))
        else:
            raise AssertionError(a)
    return PresetOptions(tensor_types=tuple(tensor_types), **kw)


def _case_id(case: dict) -> str:
    return "-".join([case["model"], case["preset"], *case["args"]])


@pytest.mark.parametrize("case", oracle()["cases"], ids=_case_id)
def test_oracle_matches_llama_quantize_dry_run(case: dict) -> None:
    model = oracle()["models"][case["model"]]
    tensors = [T(t["name"], tuple(t["shape"]), t["dtype"]) for t in model["tensors"]]
    opts = options_from(case["args"])
    choices = plan(tensors, model["metadata"], case["preset"], opts)
    want = case["types"].split()
    assert {c.name: (c.type, c.reason) for c, w in zip(choices, want) if c.type != w} == {}
    assert fallback_count(choices) == case["fallbacks"]
    # llama-quantize warns "will require an imatrix" only when none was given
    assert (not opts.has_imatrix and any(c.requires_imatrix for c in choices)) == case["requires_imatrix"]


def test_oracle_covers_the_rules() -> None:
    cases = oracle()["cases"]
    assert len(cases) >= 400
    assert {c["preset"] for c in cases} == {p for p in presets.PRESETS if p not in ("Q3_K", "Q4_K", "Q5_K")}


# -- the rules, one by one -------------------------------------------------------------------------


def llama(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, tied=False, arch="llama",
          n_expert=0, dtype="F32") -> tuple[list[T], dict]:
    t = [T("token_embd.weight", (32000, n_embd), dtype), T("output_norm.weight", (n_embd,))]
    if not tied:
        t.append(T("output.weight", (32000, n_embd), dtype))
    for i in range(n_layer):
        p = f"blk.{i}."
        t += [T(p + "attn_norm.weight", (n_embd,)), T(p + "ffn_norm.weight", (n_embd,))]
        t += [T(p + f"attn_{x}.weight", (n_embd, n_embd), dtype) for x in ("q", "k", "v", "output")]
        if n_expert:
            t += [T(p + "ffn_gate_inp.weight", (n_expert, n_embd), dtype),
                  T(p + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd), dtype),
                  T(p + "ffn_up_exps.weight", (n_expert, n_ff, n_embd), dtype),
                  T(p + "ffn_down_exps.weight", (n_expert, n_embd, n_ff), dtype)]
        else:
            t += [T(p + "ffn_gate.weight", (n_ff, n_embd), dtype), T(p + "ffn_up.weight", (n_ff, n_embd), dtype),
                  T(p + "ffn_down.weight", (n_embd, n_ff), dtype)]
    meta = {"general.architecture": arch, f"{arch}.block_count": n_layer,
            f"{arch}.attention.head_count": n_head, f"{arch}.attention.head_count_kv": n_head_kv}
    if n_expert:
        meta[f"{arch}.expert_count"] = n_expert
    return t, meta


def types(choices, part: str) -> list[str]:
    return [c.type for c in choices if part in c.name]


def test_llama_32_layers_q4_k_m_use_more_bits() -> None:
    tensors, meta = llama()
    choices = plan(tensors, meta, "Q4_K_M")
    # use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
    bumped = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert types(choices, "attn_v") == ["Q6_K" if i in bumped else "Q4_K" for i in range(32)]
    assert types(choices, "ffn_down") == ["Q6_K" if i in bumped else "Q4_K" for i in range(32)]
    assert types(choices, "attn_q") == ["Q4_K"] * 32
    assert [c.type for c in choices if c.name == "output.weight"] == ["Q6_K"]
    assert types(choices, "token_embd") == ["Q4_K"]  # not tied: the default type
    assert fallback_count(choices) == 0


def test_gqa_bumps_attn_v() -> None:
    gqa, meta = llama(n_head=32, n_head_kv=8)
    mha, meta_mha = llama(n_head=32, n_head_kv=32)
    for preset, with_gqa, without in [("Q2_K", "Q4_K", "Q3_K"), ("Q2_K_S", "Q4_K", "Q2_K"),
                                      ("IQ3_S", "Q4_K", "IQ3_S"), ("IQ4_XS", "Q5_K", "IQ4_XS"),
                                      ("IQ2_XS", "Q4_K", "Q2_K")]:
        opts = PresetOptions(has_imatrix=True)
        v = [c for c in plan(gqa, meta, preset, opts) if "attn_v" in c.name]
        assert {c.type for c in v} == {with_gqa}, preset
        assert "n_gqa 4 >= 4" in v[0].reason
        assert set(types(plan(mha, meta_mha, preset, opts), "attn_v")) == {without}, preset


def test_moe_with_8_experts() -> None:
    tensors, meta = llama(n_embd=1024, n_ff=2816, n_expert=8)
    choices = {c.name: c for c in plan(tensors, meta, "Q4_K_M")}
    assert choices["blk.5.attn_v.weight"].type == "Q8_0"
    assert choices["blk.5.attn_k.weight"].type == "Q8_0"
    assert choices["blk.5.attn_output.weight"].type == "Q5_K"
    assert choices["blk.5.ffn_gate_inp.weight"].type == "F32"  # the router is never quantized
    assert choices["blk.5.ffn_gate_inp.weight"].reason == "expert router: kept"
    # ffn_down_exps: the layer comes from the name, not a counter
    assert choices["blk.0.ffn_down_exps.weight"].type == "Q6_K"
    assert choices["blk.4.ffn_down_exps.weight"].type == "Q4_K"
    iq = {c.name: c.type for c in plan(tensors, meta, "IQ2_XXS", PresetOptions(has_imatrix=True))}
    assert iq["blk.5.attn_k.weight"] == "Q4_K" and iq["blk.5.attn_output.weight"] == "Q5_K"


def test_moe_tensor_without_layer_number_is_an_input_error() -> None:
    tensors, meta = llama(n_layer=2, n_embd=256, n_ff=256, n_expert=8)
    with pytest.raises(InputError, match="Failed to determine layer for tensor shared.ffn_down_exps.weight"):
        plan(tensors + [T("shared.ffn_down_exps.weight", (8, 256, 256))], meta, "Q4_K_M")


def test_tied_embeddings_take_the_output_rules() -> None:
    tied, meta = llama(tied=True)
    untied, _ = llama()
    assert types(plan(tied, meta, "Q4_K_M"), "token_embd") == ["Q6_K"]
    assert types(plan(untied, meta, "Q4_K_M"), "token_embd") == ["Q4_K"]
    assert types(plan(tied, meta, "IQ2_XXS", PresetOptions(has_imatrix=True)), "token_embd") == ["Q5_K"]
    assert types(plan(untied, meta, "IQ2_XXS", PresetOptions(has_imatrix=True)), "token_embd") == ["Q2_K"]
    # --output-tensor-type reaches a tied token_embd (through the mixture, so the fallback applies)
    c = [c for c in plan(tied, meta, "Q4_K_M", PresetOptions(output_tensor_type="q8_0")) if "token_embd" in c.name]
    assert c[0].type == "Q8_0" and "--output-tensor-type" in c[0].reason


def test_70b_bumps_attn_v_to_q5_k() -> None:
    tensors, meta = llama(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8)
    v = [c for c in plan(tensors, meta, "Q3_K_M") if "attn_v" in c.name]
    assert {c.type for c in v} == {"Q5_K"}
    assert "70B" in v[5].reason
    not_70b = dict(meta, **{"llama.attention.head_count_kv": 64})  # 65B: MHA
    assert set(types(plan(tensors, not_70b, "Q3_K_M"), "attn_v")) == {"Q5_K", "Q4_K"}


def test_pure_gives_every_quantized_tensor_the_default_type() -> None:
    tensors, meta = llama(n_layer=4)
    choices = plan(tensors, meta, "Q4_K_M", PresetOptions(pure=True))
    assert {c.type for c in choices if not c.reason.endswith("kept")} == {"Q4_K"}
    assert {c.reason for c in choices if not c.reason.endswith("kept")} == {"--pure: Q4_K"}


def test_pure_still_falls_back() -> None:
    tensors, meta = llama(n_layer=2, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3)
    choices = {c.name: c for c in plan(tensors, meta, "Q4_K_M", PresetOptions(pure=True))}
    assert choices["blk.0.attn_q.weight"].type == "Q5_0"
    assert choices["blk.0.attn_q.weight"].reason == "--pure: Q4_K; fallback: 576 not divisible by 256 (Q4_K) -> Q5_0"
    assert choices["blk.0.ffn_down.weight"].type == "Q4_K"


def test_leave_output_tensor() -> None:
    tensors, meta = llama(n_layer=2)
    c = {c.name: c for c in plan(tensors, meta, "Q4_K_M", PresetOptions(leave_output_tensor=True))}
    assert (c["output.weight"].type, c["output.weight"].reason) == ("F32", "--leave-output-tensor: kept")
    assert c["token_embd.weight"].type == "Q4_K"  # output.weight exists: not tied


def test_tensor_type_overrides_first_match_wins_then_fallback() -> None:
    tensors, meta = llama(n_layer=4, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3)
    opts = PresetOptions(tensor_types=(("attn_v", "q8_0"), ("ATTN", "q4_k"), (r"blk\.[01]\.ffn_down", "IQ4_XS")))
    c = {c.name: c for c in plan(tensors, meta, "Q4_K_M", opts)}
    assert (c["blk.0.attn_v.weight"].type, c["blk.0.attn_v.weight"].reason) == ("Q8_0", "--tensor-type attn_v=Q8_0")
    # the name is lower-cased as llama-quantize does; the fallback still applies to a manual type
    assert c["blk.0.attn_q.weight"].type == "Q5_0"
    assert c["blk.0.attn_q.weight"].reason == "--tensor-type attn=Q4_K; fallback: 576 not divisible by 256 (Q4_K) -> Q5_0"
    assert c["blk.1.ffn_down.weight"].type == "IQ4_XS"
    assert c["blk.2.ffn_down.weight"].type == "Q4_K"  # a manual type skips the counters: #2 of 4 is not bumped
    # an F16 preset ignores --tensor-type (only quantized defaults look at it)
    assert types(plan(tensors, meta, "F16", opts), "attn_v") == ["F16"] * 4


def test_token_embedding_type_skips_the_fallback_and_fails_at_quantize_time() -> None:
    tensors, meta = llama(n_layer=2, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, tied=True)
    opts = PresetOptions(token_embedding_type="Q4_K", dry_run=True)
    c = {c.name: c for c in plan(tensors, meta, "Q4_K_M", opts)}
    assert (c["token_embd.weight"].type, c["token_embd.weight"].fallback) == ("Q4_K", False)
    # llama-quantize: "ggml_validate_row_data: invalid size ... quantized data validation failed"
    with pytest.raises(UsageError, match="rows of 576 do not fit Q4_K"):
        plan(tensors, meta, "Q4_K_M", PresetOptions(token_embedding_type="Q4_K"))


def test_fallback_to_f16_when_rows_are_not_a_multiple_of_32() -> None:
    tensors, meta = llama(n_layer=2, n_embd=256, n_ff=100, n_head=8, n_head_kv=8)
    choices = plan(tensors, meta, "Q4_K_M")
    down = [c for c in choices if "ffn_down" in c.name]
    assert [c.type for c in down] == ["F16", "F16"]
    assert down[1].reason == ("Q4_K_M: ffn_down -> Q6_K (use_more_bits layer 1 of 2); "
                              "fallback: 100 not divisible by 256 (Q6_K) -> F16 (unusual shape)")
    assert fallback_count(choices) == 2
    # a 32-block type that does not fit goes straight to F16 (and counts)
    assert types(plan(tensors, meta, "Q8_0"), "ffn_down") == ["F16", "F16"]
    assert fallback_count(plan(tensors, meta, "Q8_0")) == 2


@pytest.mark.parametrize("preset", ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS",
                                    "IQ3_XS", "Q2_K_S"])
def test_imatrix_required(preset: str) -> None:
    tensors, meta = llama(n_layer=8)
    assert get_preset(preset).requires_imatrix
    with pytest.raises(UsageError, match="requires an importance matrix") as exc:
        plan(tensors, meta, preset)
    assert "--imatrix" in exc.value.hint
    plan(tensors, meta, preset, PresetOptions(has_imatrix=True))
    plan(tensors, meta, preset, PresetOptions(dry_run=True))
    # an imatrix emptied by --include/--exclude-weights is no imatrix
    with pytest.raises(UsageError, match="requires an importance matrix"):
        plan(tensors, meta, preset, PresetOptions(has_imatrix=True, imatrix_names=frozenset()))


@pytest.mark.parametrize("preset", ["Q2_K", "IQ3_S", "IQ3_M", "IQ4_XS", "TQ1_0", "Q4_0", "Q4_K_M"])
def test_imatrix_not_required(preset: str) -> None:
    tensors, meta = llama(n_layer=8)
    assert not get_preset(preset).requires_imatrix
    assert not any(c.requires_imatrix for c in plan(tensors, meta, preset))


def test_tensor_missing_from_the_imatrix() -> None:
    tensors, meta = llama(n_layer=2)
    names = frozenset(t.name for t in tensors if "blk.1.ffn_down" not in t.name)
    with pytest.raises(UsageError, match="missing importance matrix for tensor blk.1.ffn_down.weight"):
        plan(tensors, meta, "IQ2_XXS", PresetOptions(has_imatrix=True, imatrix_names=names))
    # not an error for types that do not need one
    plan(tensors, meta, "Q4_K_M", PresetOptions(has_imatrix=True, imatrix_names=names))


def test_imatrix_changes_choices() -> None:
    tensors, meta = llama(n_layer=16, n_head_kv=32)
    no, yes = plan(tensors, meta, "IQ4_XS"), plan(tensors, meta, "IQ4_XS", PresetOptions(has_imatrix=True))
    assert types(no, "ffn_down")[:3] == ["Q5_K", "Q5_K", "IQ4_XS"]
    assert types(yes, "ffn_down")[:3] == ["IQ4_XS"] * 3
    q40 = plan(tensors, meta, "Q4_0", PresetOptions(has_imatrix=True))
    assert types(q40, "ffn_down")[:3] == ["Q4_1", "Q4_1", "Q4_0"]


def test_requantized_lists_what_needs_allow_requantize() -> None:
    tensors, meta = llama(n_layer=2, dtype="Q8_0")
    names = [c.name for c in presets.requantized(tensors, plan(tensors, meta, "Q4_K_M"))]
    assert len(names) == 2 * 7 + 2 and "output.weight" in names and "blk.0.attn_norm.weight" not in names
    assert presets.requantized(tensors, plan(tensors, meta, "Q8_0")) == []  # same type: copied
    assert presets.requantized(tensors, plan(tensors, meta, "COPY")) == []
    f16, _ = llama(n_layer=2, dtype="F16")
    assert presets.requantized(f16, plan(f16, meta, "Q4_K_M")) == []  # F16/BF16/F32 are not quantized


def test_copy_keeps_everything_and_the_input_file_type() -> None:
    tensors, meta = llama(n_layer=2, dtype="Q4_K")
    choices = plan(tensors, meta, "COPY")
    assert all(c.type == t.dtype and c.reason == "COPY: kept" for c, t in zip(choices, tensors))
    assert file_type("COPY", tensors, dict(meta, **{"general.file_type": 15})) == 15
    # no general.file_type: guessed from the most common type, with LLAMA_FTYPE_GUESSED
    assert file_type("COPY", tensors, meta) == 15 | 1024
    assert file_type("Q4_K_M", tensors, meta) == 15


def test_never_quantized_tensors() -> None:
    _, meta = llama(n_layer=1)
    extra = [T("position_embd.weight", (512, 256)), T("blk.0.attn_rel_b.weight", (32, 256)),
             T("blk.0.ssm_conv1d.weight", (4, 256)), T("blk.0.attn_k_norm.weight", (2, 256)),
             T("blk.0.ffn_up.bias", (2, 256)), T("blk.0.vec.weight", (1, 256)), T("abcde", (2, 256)),
             T("blk.0.time_mix_w1.weight", (2, 256))]
    c = {c.name: c for c in plan(extra, meta, "Q8_0")}
    assert {n: x.type for n, x in c.items()} == {**{t.name: "F32" for t in extra}, "abcde": "Q8_0"}
    assert c["blk.0.vec.weight"].reason == "1-D: kept"  # ne = [256, 1]: ggml_n_dims is 1
    assert c["blk.0.ffn_up.bias"].reason == "not a weight: kept"
    assert c["blk.0.attn_k_norm.weight"].reason == "norm: kept"


def test_order_follows_llama_quantize_not_the_input() -> None:
    tensors, meta = llama(n_layer=16)
    shuffled = [tensors[i] for i in np.random.default_rng(0).permutation(len(tensors))]
    a = {c.name: c.type for c in plan(tensors, meta, "Q3_K_M")}
    b = plan(shuffled, meta, "Q3_K_M")
    assert [c.name for c in b] == [t.name for t in shuffled]  # returned in the caller's order
    assert {c.name: c.type for c in b} == a
    assert types(plan(tensors, meta, "Q3_K_M"), "attn_v")[:3] == ["Q5_K", "Q5_K", "Q4_K"]


def test_metadata_forms() -> None:
    tensors, meta = llama(n_layer=8)
    want = [c.type for c in plan(tensors, meta, "Q2_K")]

    class Reader:  # formats.base.ModelReader.meta
        def meta(self, key, default=None):
            return meta.get(key, default)

    kv = {k: KV(0, v) for k, v in meta.items()}
    arrays = dict(meta, **{"llama.attention.head_count_kv": np.array([8] * 8, dtype=np.uint32)})
    for m in (Reader(), Reader().meta, kv, arrays):
        assert [c.type for c in plan(tensors, m, "Q2_K")] == want
    with pytest.raises(InputError, match="general.architecture"):
        plan(tensors, {}, "Q2_K")


def test_get_preset() -> None:
    p = get_preset("q4_k_m")
    assert (p.name, p.ftype, p.default_type, p.requires_imatrix) == ("Q4_K_M", 15, "Q4_K", False)
    assert get_preset("15").name == "Q4_K" == get_preset(15).name  # the first QUANT_OPTIONS entry: the alias
    assert get_preset("0").name == "F32"
    assert get_preset("Q4_K").ftype == 15  # alias
    assert get_preset("IQ2_M").default_type == "IQ2_S"
    assert get_preset("COPY").ftype == 0
    with pytest.raises(UsageError, match="unknown preset 'Q4KM'; known: Q4_0, Q4_1"):
        get_preset("Q4KM")


def test_bad_type_names() -> None:
    tensors, meta = llama(n_layer=1)
    with pytest.raises(UsageError, match="unknown --tensor-type type 'Q9_K'"):
        plan(tensors, meta, "Q4_K_M", PresetOptions(tensor_types=(("attn", "Q9_K"),)))
    with pytest.raises(UsageError, match="unknown --output-tensor-type type 'q7'"):
        plan(tensors, meta, "Q4_K_M", PresetOptions(output_tensor_type="q7"))
    with pytest.raises(UsageError, match="bad regex"):
        plan(tensors, meta, "Q4_K_M", PresetOptions(tensor_types=(("attn[", "Q8_0"),)))
