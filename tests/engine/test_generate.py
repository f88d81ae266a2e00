"""Generation: incremental decoding with the KV cache gives what recomputing the whole prefix gives,
for every architecture; sampling; detokenization; the errors."""

from __future__ import annotations

import numpy as np
import pytest

from quantcli.engine import ops
from quantcli.engine.generate import GenerateOptions, Generator, sample
from quantcli.engine.model import Model, forward
from quantcli.engine.tokenizer import Tokenizer
from quantcli.errors import UsageError
from quantcli.formats import open_model
from tests.llama_tools import llama_tool
from tests.models import ARCHS, write_model

PROMPT = "the cat sat on the mat and the"


def _model(tmp_path, arch: str) -> str:
    kw = dict(sliding_window=8, swa_pattern=2) if arch == "gemma3" else {}
    return write_model(tmp_path / f"{arch}.gguf", arch, n_layer=2, seed=5, scale=0.3, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_greedy_decoding_equals_recomputing_the_prefix(tmp_path, arch):
    with open_model(_model(tmp_path, arch)) as r:
        model = Model(r)
        prompt = Tokenizer.from_model(r).encode(PROMPT)
        seen: list[np.ndarray] = []
        gen = Generator(model).generate(prompt, GenerateOptions(max_tokens=12),
                                        on_logits=lambda z: seen.append(z.copy()))
        assert len(gen.tokens) == 12 and not gen.stopped
        seq = list(prompt)
        for step, tok in enumerate(gen.tokens):
            full = forward(model, np.array(seq))[0, -1]  # every position again, no cache
            # the new token's k and v come from a 1-row product, the prefix's from a T-row one: float
            # sums in another order, then the fp16 rounding of the cache
            np.testing.assert_allclose(seen[step], full, rtol=1e-3, atol=1e-3)
            assert tok == int(np.argmax(full))
            seq.append(tok)


def test_a_batch_decodes_what_each_prompt_decodes_alone(tmp_path):
    with open_model(_model(tmp_path, "gemma3")) as r:
        tok = Tokenizer.from_model(r)
        gen = Generator(Model(r))
        prompts = [tok.encode(t) for t in ("the cat", "a hat on the mat and then the", "sat")]
        opts = GenerateOptions(max_tokens=10, stop=frozenset({7}))
        together = gen.generate_batch(prompts, opts)
        for p, g in zip(prompts, together):
            assert g.tokens == gen.generate(p, opts).tokens


def test_attention_against_a_cache_is_the_last_rows_of_the_full_one():
    rng = np.random.default_rng(0)
    T, n = 20, 7
    q = rng.standard_normal((T, 4, 8)).astype(np.float32)
    k = rng.standard_normal((T, 2, 8)).astype(np.float32)
    v = rng.standard_normal((T, 2, 8)).astype(np.float32)
    for window in (0, 5):
        full = ops.attention(q, k, v, 0.3, window)
        tail = ops.attention(q[-n:], k, v, 0.3, window)
        np.testing.assert_allclose(tail, full[-n:], rtol=1e-6, atol=1e-6)


def test_batched_decode_attention_is_each_sequence_alone():
    rng = np.random.default_rng(1)
    lengths = (1, 9, 4, 13)
    q = rng.standard_normal((len(lengths), 4, 8)).astype(np.float32)
    kvs = [(rng.standard_normal((n, 2, 8)).astype(np.float32), rng.standard_normal((n, 2, 6)).astype(np.float32))
           for n in lengths]
    for window in (0, 5):
        together = ops.decode_attention(q, kvs, 0.3, window)
        for b, (k, v) in enumerate(kvs):
            np.testing.assert_allclose(together[b], ops.attention(q[b:b + 1], k, v, 0.3, window)[0],
                                       rtol=1e-5, atol=1e-6)


def test_prefill_of_several_prompts_is_each_fed_alone_and_caches_fork(tmp_path):
    with open_model(_model(tmp_path, "gemma3")) as r:
        tok = Tokenizer.from_model(r)
        gen = Generator(Model(r))
        prompts = [tok.encode(t) for t in ("the cat", "a hat on the mat and then the", "sat")]
        caches, z = gen.prefill(prompts)
        for b, p in enumerate(prompts):
            alone = gen.new_caches()
            np.testing.assert_allclose(z[b], gen.feed(alone, p), rtol=1e-4, atol=1e-4)
            assert [c.n for c in caches[b]] == [len(p)] * len(alone)
        fork = [c.copy() for c in caches[0]]
        a = gen.step([caches[0]], [5])
        assert fork[0].n == len(prompts[0])  # the original moved on, the copy did not
        np.testing.assert_allclose(gen.step([fork], [5]), a, rtol=1e-5, atol=1e-5)


def test_stop_tokens_end_it_and_seeded_sampling_repeats(tmp_path):
    with open_model(_model(tmp_path, "llama")) as r:
        gen = Generator(Model(r))
        prompt = Tokenizer.from_model(r).encode(PROMPT)
        greedy = gen.generate(prompt, GenerateOptions(max_tokens=6)).tokens
        cut = gen.generate(prompt, GenerateOptions(max_tokens=6, stop=frozenset({greedy[2]})))
        assert cut.stopped and cut.tokens == greedy[:greedy.index(greedy[2])]
        hot = GenerateOptions(max_tokens=10, temperature=1.5, top_k=0, top_p=1.0, seed=7)
        a, b = gen.generate(prompt, hot).tokens, gen.generate(prompt, hot).tokens
        assert a == b
        others = {tuple(gen.generate(prompt, GenerateOptions(max_tokens=10, temperature=1.5, top_k=0, top_p=1.0,
                                                             seed=s)).tokens) for s in range(4)}
        assert len(others) > 1
        assert gen.generate(prompt, GenerateOptions(max_tokens=6, temperature=1.0, top_k=1, seed=3)).tokens == greedy


def test_sampling_keeps_to_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = {sample(logits, GenerateOptions(temperature=1.0, top_k=2, top_p=1.0), rng) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample(logits, GenerateOptions(temperature=1.0, top_k=0, top_p=0.75), rng) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 is the first to reach 0.75
    assert sample(logits, GenerateOptions(temperature=0.0), rng) == 0


def test_detokenize_joins_bytes_across_tokens(tmp_path):
    with open_model(_model(tmp_path, "llama")) as r:
        tok = Tokenizer.from_model(r)
        ids = tok.encode("the café", add_special=False)
        assert tok.detokenize(ids) == " the café"  # the SPM space prefix; é is two byte tokens
        assert tok.detokenize([tok.vocab.bos_id]) == ""  # control tokens print nothing
        assert tok.vocab.eos_id in tok.eog_ids()


def test_errors(tmp_path):
    with open_model(_model(tmp_path, "llama")) as r:
        gen = Generator(Model(r), n_ctx=16)
        with pytest.raises(UsageError, match="the prompt is empty"):
            gen.generate([])
        with pytest.raises(UsageError, match="the context holds 16 tokens"):
            gen.generate(list(range(5, 25)))
        with pytest.raises(UsageError, match="temperature must be 0 or more"):
            gen.generate([2, 5], GenerateOptions(temperature=-1))
        out = gen.generate([2, 5, 6], GenerateOptions(max_tokens=100))
        assert len(out.tokens) == 14  # the context (16) ends it; the last one is not fed


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):", "Once upon a time, a"])
def test_greedy_generation_equals_llama_cpp_on_the_real_model(real_f32, prompt):
    """llama.cpp's examples/simple (greedy, BOS added, stops at end-of-generation) on the F32 base
    prints the prompt and its continuation; ours is the same text. Skips without llama-simple."""
    import subprocess

    exe = llama_tool("llama-simple")
    if exe is None:
        pytest.skip("llama-simple not found (set QUANTCLI_LLAMA_BIN)")
    proc = subprocess.run([str(exe), "-m", str(real_f32), "-n", "24", prompt], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = proc.stdout.decode("utf-8", errors="replace")
    assert theirs.startswith("<bos>" + prompt)
    with open_model(real_f32) as r:
        tok = Tokenizer.from_model(r)
        out = Generator(Model(r)).generate(tok.encode(prompt), GenerateOptions(max_tokens=24, stop=tok.eog_ids()))
    assert theirs[len("<bos>" + prompt):].rstrip("\n") == tok.detokenize(out.tokens).rstrip("\n")
