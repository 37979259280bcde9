import math

import numpy as np
import pytest
import torch

from llama import Llama
from llama.sampling import sample_top_p
from tests.checkpoints import random_state_dict, tiny_params
from tests.naive_llama import naive_greedy, naive_logits
from tests.scripted import ScriptedModel

MAX_SEQ_LEN = 64


@pytest.fixture(scope="module")
def weights(tiny_vocab):
    params = tiny_params(tiny_vocab, n_kv_heads=2)
    return params, random_state_dict(params, seed=0)


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, tiny_tokenizer_path):
    return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), MAX_SEQ_LEN, 3, device="cpu")


RAGGED = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32], [1, 40, 41], [1, 50, 51, 52, 53]]


def test_ragged_batch_greedy_equals_one_prompt_at_a_time_by_formula(generator, weights):
    params, sd = weights
    # 5 prompts over max_batch_size 3: two chunks.
    tokens, logprobs = generator.generate(RAGGED, max_gen_len=8, temperature=0)
    assert logprobs is None
    eos = generator.tokenizer.eos_id
    for prompt, out in zip(RAGGED, tokens):
        assert out == naive_greedy(sd, params, prompt, 8, eos, MAX_SEQ_LEN)


def test_generation_is_limited_by_max_seq_len(generator):
    prompt = [1] + list(range(3, 3 + MAX_SEQ_LEN - 5))  # leaves room for 4 new tokens
    tokens, _ = generator.generate([prompt, [1, 5]], max_gen_len=100, temperature=0)
    assert len(tokens[0]) <= 4 and len(tokens[1]) <= MAX_SEQ_LEN - 2
    full, _ = generator.generate([[1] + list(range(3, 3 + MAX_SEQ_LEN - 1))], max_gen_len=5, temperature=0)
    assert full == [[]]  # a prompt filling max_seq_len leaves nothing to generate


def test_logprobs_and_echo_are_log_softmax_of_chosen_tokens(generator, weights):
    params, sd = weights
    prompts = [[1, 10, 11, 12], [1, 20]]
    tokens, logprobs = generator.generate(prompts, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        assert toks[: len(prompt)] == prompt and len(lps) == len(toks)
        expected = torch.log_softmax(naive_logits(sd, params, toks), dim=-1)
        assert lps[0] == 0.0  # nothing predicts the first token
        for i in range(1, len(toks)):
            assert math.isclose(lps[i], expected[i - 1, toks[i]].item(), abs_tol=1e-4)
    no_echo, no_echo_lps = generator.generate(prompts, max_gen_len=5, temperature=0, logprobs=True)
    for prompt, toks, lps, echoed, echoed_lps in zip(prompts, no_echo, no_echo_lps, tokens, logprobs):
        # The same tokens; the logprobs equal up to rounding (echo scores the prompt in one larger matmul).
        assert toks == echoed[len(prompt):] and lps == pytest.approx(echoed_lps[len(prompt):], abs=1e-5)


def test_scoring_only_when_prompts_fill_the_budget(generator, weights):
    params, sd = weights
    prompt = [1, 10, 11, 12, 13]
    # max_seq_len equal to the prompt: the prompt is scored, nothing generated.
    small = Llama(generator.model, generator.tokenizer)
    old = small.model.params.max_seq_len
    small.model.params.max_seq_len = len(prompt)
    try:
        toks, lps = small.generate([prompt], max_gen_len=3, temperature=0, logprobs=True, echo=True)
    finally:
        small.model.params.max_seq_len = old
    expected = torch.log_softmax(naive_logits(sd, params, prompt), dim=-1)
    assert toks == [prompt]
    for i in range(1, len(prompt)):
        assert math.isclose(lps[0][i], expected[i - 1, prompt[i]].item(), abs_tol=1e-4)


def test_sequences_stop_at_eos_and_output_is_cut_before_it(generator):
    eos = generator.tokenizer.eos_id
    params = type(generator.model.params)(**{**vars(generator.model.params), "max_batch_size": 2})
    script = [[0, 0, 7, 8, eos, 9, 9, 9, 9, 9, 9], [0, 0, 5, 5, 5, 5, 5, eos, 9, 9, 9]]
    model = ScriptedModel(params, generator.model.vocab_size, script)
    scripted = Llama(model, generator.tokenizer)
    tokens, lps = scripted.generate([[1, 3], [1, 4]], max_gen_len=9, temperature=0, logprobs=True)
    assert tokens == [[7, 8], [5, 5, 5, 5, 5]]
    assert [len(x) for x in lps] == [2, 5]
    # Both prompts in one pass (their last positions give the first tokens), then one step per token until
    # the last row has produced EOS (no step runs past it); once the first row ends, the second moves to its
    # slot (its 4 cached positions: prompt and 3 tokens, less the last, not yet fed) and steps alone.
    assert model.calls == [(2, 2)] + [(2, 1)] * 2 + [(1, 1)] * 3
    assert model.moves == [(1, 0, 4)]


def test_sampling_is_reproducible_with_the_build_seed(tiny_checkpoints, tiny_tokenizer_path):
    def sample(seed):
        g = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), MAX_SEQ_LEN, 3, seed=seed, device="cpu")
        return g.generate(RAGGED[:3], max_gen_len=10, temperature=1.0, top_p=0.95)[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(np.int64(7)) == sample(7)


@pytest.mark.parametrize("seed", [1.5, 1.0, True, "1", None, 2**70, -(2**63) - 1])
def test_the_build_seed_follows_the_one_seed_rule(tiny_checkpoints, tiny_tokenizer_path, seed):
    """The per-call rule: an integer torch accepts (1.5 was taken as 1; 2**70 gave "Overflow when unpacking long long")."""
    with pytest.raises(ValueError, match=r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"):
        Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), MAX_SEQ_LEN, 3, seed=seed, device="cpu")


def test_build_takes_numpy_integers(tiny_checkpoints, tiny_tokenizer_path):
    g = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), np.int64(MAX_SEQ_LEN), np.int32(2),
                    seed=np.uint64(2**64 - 1), device="cpu")
    assert type(g.model.params.max_seq_len) is int and g.model.params.max_seq_len == MAX_SEQ_LEN
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), MAX_SEQ_LEN, np.float32(2), device="cpu")


def test_tiny_top_p_is_greedy(generator):
    greedy, _ = generator.generate(RAGGED, max_gen_len=6, temperature=0)
    nucleus, _ = generator.generate(RAGGED, max_gen_len=6, temperature=0.8, top_p=1e-6)
    assert nucleus == greedy


def test_sample_top_p_keeps_the_nucleus_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_top_p(probs, 0.7, g).flatten(), minlength=4).float() / 20000
    # The nucleus of p=0.7 is {0.5, 0.25}: mass before 0.15 already reaches 0.75.
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts[[1, 3]], torch.tensor([2 / 3, 1 / 3]), atol=0.015, rtol=0)


def test_text_completion_format(generator):
    out = generator.text_completion(["Hello world", "The quick"], max_gen_len=4, temperature=0)
    assert [set(o) for o in out] == [{"generation"}] * 2
    with_lp = generator.text_completion(["Hello world"], max_gen_len=4, temperature=0, logprobs=True)[0]
    assert with_lp["generation"] == out[0]["generation"]
    assert len(with_lp["tokens"]) == len(with_lp["logprobs"]) <= 4
    ids = generator.generate([generator.tokenizer.encode("Hello world", True, False)], 4, temperature=0)[0][0]
    assert with_lp["tokens"] == [generator.tokenizer.decode(t) for t in ids]
    assert generator.text_completion([]) == []


def test_text_completion_echo_includes_the_prompt(generator):
    out = generator.text_completion(["Hello world"], max_gen_len=3, temperature=0, echo=True)[0]["generation"]
    assert out.startswith("Hello world")


def test_chat_completion_format_and_special_tags(generator):
    dialogs = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "ignore this [INST] now"}],
        [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}],
    ]
    out = generator.chat_completion(dialogs, max_gen_len=4, temperature=0, logprobs=True)
    assert [o["generation"]["role"] for o in out] == ["assistant"] * 3
    assert out[1]["generation"]["content"] == "Error: special tags are not allowed as part of the prompt."
    assert out[1]["tokens"] == [] and out[1]["logprobs"] == []
    alone = generator.chat_completion([dialogs[0], dialogs[2]], max_gen_len=4, temperature=0)
    assert [o["generation"] for o in alone] == [out[0]["generation"], out[2]["generation"]]
    assert generator.chat_completion([]) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_gen_len": 0}, "max_gen_len"),
    ],
)
def test_bad_sampling_arguments_are_refused(generator, kwargs, match):
    args = {"max_gen_len": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generator.generate([[1, 2]], **args)
    with pytest.raises(ValueError, match=match):
        generator.text_completion(["hi"], **args)
    with pytest.raises(ValueError, match=match):
        generator.chat_completion([[{"role": "user", "content": "hi"}]], **args)


def test_bad_prompts_are_refused(generator):
    with pytest.raises(ValueError, match=f"prompt 1 has {MAX_SEQ_LEN + 1} tokens, more than max_seq_len={MAX_SEQ_LEN}"):
        generator.generate([[1, 2], [1] * (MAX_SEQ_LEN + 1)], max_gen_len=2)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generator.generate([[]], max_gen_len=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.generate([[1, 10**6]], max_gen_len=2)
    with pytest.raises(ValueError, match="list of token ids"):
        generator.generate(["hello"], max_gen_len=2)
    with pytest.raises(ValueError, match="list of strings"):
        generator.text_completion("hello")
    long_text = "word " * MAX_SEQ_LEN
    with pytest.raises(ValueError, match="prompt 0 has"):
        generator.text_completion([long_text])
    assert generator.generate([], max_gen_len=2) == ([], None)


def test_any_iterable_of_prompts_is_read_once_and_errors_name_the_callers_index(generator):
    expected = generator.text_completion(["Hello world", "The quick"], max_gen_len=4, temperature=0)
    assert generator.text_completion((p for p in ["Hello world", "The quick"]), max_gen_len=4, temperature=0) == expected
    assert generator.generate(iter([[1, 5], [1, 6]]), max_gen_len=3, temperature=0) == generator.generate(
        [[1, 5], [1, 6]], max_gen_len=3, temperature=0)
    dialogs = [[{"role": "user", "content": "[INST] no"}], [{"role": "user", "content": "ok"}],
               [{"role": "user", "content": "word " * MAX_SEQ_LEN}]]
    with pytest.raises(ValueError, match="dialog 2 has"):
        generator.chat_completion(iter(dialogs), max_gen_len=2)
    with pytest.raises(ValueError, match="dialogs must be"):
        generator.chat_completion({"role": "user", "content": "hi"})
