import numpy as np
import pytest
import torch

from llama import Llama
from llama.sampling import SamplingParams, TokenHistory, apply_repetition_penalty, next_tokens
from llama.tokenizer import Tokenizer
from tests.scripted import scripted_llama

PROMPTS = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31, 32]]


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, tiny_tokenizer_path):
    return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 64, 3, device="cpu")


def test_top_k_1_is_greedy(generator):
    greedy, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=0)
    top1, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=1.5, top_p=1.0, top_k=1)
    assert top1 == greedy


def test_top_k_samples_only_the_k_likeliest_in_proportion():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]])).repeat(20000, 1)
    torch.manual_seed(0)
    picks = next_tokens(logits, [SamplingParams(temperature=1.0, top_p=1.0, top_k=2)] * len(logits), [None] * len(logits))
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    assert freq[0] == 0 and freq[1] == 0
    torch.testing.assert_close(freq[2:], torch.tensor([3 / 7, 4 / 7]), atol=0.015, rtol=0)


def test_each_row_samples_with_its_own_settings_and_generator():
    """A batch mixing greedy, top-k, top-p, penalised and seeded rows: each row equals that row alone."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    seen = torch.rand(6, 50) < 0.2
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=5, seed=1),
        SamplingParams(temperature=1.2, top_p=0.5, seed=2),
        SamplingParams(temperature=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.3, seed=3),
        SamplingParams(temperature=0.7, top_p=1.0, seed=4),
    ]

    def generators():
        return [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]

    together = next_tokens(logits, params, generators(), seen).tolist()
    alone = [next_tokens(logits[i : i + 1], [p], [g], seen[i : i + 1]).item() for i, (p, g) in enumerate(zip(params, generators()))]
    assert together == alone
    assert together[0] == logits[0].argmax().item()
    top5 = torch.topk(logits[1] / 0.8, 5).indices.tolist()
    assert together[1] in top5
    # Unseeded rows draw together from the global generator, in row order, as one call for them would.
    unseeded = [SamplingParams(temperature=1.0, top_p=0.8)] * 3
    torch.manual_seed(5)
    mixed = next_tokens(logits[:3], unseeded, [None] * 3).tolist()
    torch.manual_seed(5)
    probs = torch.softmax(logits[:3], dim=-1)
    from llama.sampling import sample_top_p

    assert mixed == sample_top_p(probs, 0.8).reshape(-1).tolist()


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    # Seen tokens: 2.0 / 2 = 1.0 and -1.0 * 2 = -2.0; unseen ones stay.
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    # Greedy flips from a seen token (3.0 -> 1.5) to an unseen one (2.0).
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert next_tokens(torch.tensor([[3.0, 2.0]]), [greedy], [None], torch.tensor([[True, False]])).tolist() == [1]


def test_strong_repetition_penalty_avoids_every_seen_token(generator):
    tokens, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=0, repetition_penalty=1e6)
    plain, _ = generator.generate(PROMPTS, max_gen_len=10, temperature=0)
    assert tokens != plain
    for prompt, out in zip(PROMPTS, tokens):
        assert len(set(out)) == len(out) and not set(out) & set(prompt)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_tokenizer_path):
    return Tokenizer(str(tiny_tokenizer_path))


def scripted(tokenizer, text: str, prompt_len: int = 2):
    """A model that writes `text` and then EOS after a prompt of prompt_len tokens."""
    ids = tokenizer.encode(text, bos=False, eos=True)
    return scripted_llama(tokenizer, [[0] * prompt_len + ids + [0] * 8])


def test_stop_strings_cut_the_text_exactly(tiny_tokenizer):
    prompt = tiny_tokenizer.encode("x", True, False)
    llama = scripted(tiny_tokenizer, "Hello world. Paris is nice", prompt_len=len(prompt))

    def run(stop):
        (result,) = llama.text_completion(["x"], temperature=0, stop=stop, return_stats=True)
        return result["generation"], result["stats"]["stop_reason"]

    assert run(["world"]) == ("Hello ", "stop")
    assert run(["is", "."]) == ("Hello world", "stop")  # the earliest stop string wins
    assert run("Paris") == ("Hello world. ", "stop")
    assert run(["Rome"]) == ("Hello world. Paris is nice", "eos")
    tokens, _, stats = llama.generate([prompt], max_gen_len=30, temperature=0, stop=["world"], return_stats=True)
    # The tokens end with the one that completes "Hello ".
    assert tiny_tokenizer.decode(tokens[0]).startswith("Hello ")
    assert not tiny_tokenizer.decode(tokens[0][:-1]).startswith("Hello ")
    assert stats[0]["stop_reason"] == "stop" and stats[0]["generated_tokens"] == len(tokens[0])


def test_echo_with_stop_keeps_prompt_and_cuts_generation(tiny_tokenizer):
    prompt_ids = tiny_tokenizer.encode("The quick", True, False)
    llama = scripted(tiny_tokenizer, "brown fox jumps", prompt_len=len(prompt_ids))
    (result,) = llama.text_completion(["The quick"], temperature=0, echo=True, stop=["jumps"])
    assert result["generation"] == "The quick brown fox "


def test_stats_report_counts_and_reasons(generator, tiny_tokenizer):
    _, _, stats = generator.generate(PROMPTS, max_gen_len=4, temperature=0, return_stats=True)
    assert [s["prompt_tokens"] for s in stats] == [len(p) for p in PROMPTS]
    assert all(s["generated_tokens"] <= 4 and s["stop_reason"] in ("eos", "length") for s in stats)
    prompt_len = len(tiny_tokenizer.encode("x", True, False))
    llama = scripted(tiny_tokenizer, "Hello", prompt_len=prompt_len)
    (result,) = llama.text_completion(["x"], temperature=0, logprobs=True)
    assert result["stats"] == {"prompt_tokens": prompt_len, "generated_tokens": len(result["tokens"]), "stop_reason": "eos"}
    (cut,) = llama.text_completion(["x"], temperature=0, max_gen_len=1, return_stats=True)
    assert cut["stats"]["stop_reason"] == "length" and cut["stats"]["generated_tokens"] == 1
    chat = generator.chat_completion(
        [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "[INST]"}]], max_gen_len=3, return_stats=True
    )
    assert chat[0]["stats"]["prompt_tokens"] > 0 and chat[1]["stats"]["stop_reason"] == "special_tags"
    assert "stats" not in generator.text_completion(["Hi"], max_gen_len=2)[0]


def test_per_call_seed_is_reproducible(generator):
    def sample(seed):
        return generator.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.95, seed=seed)[0]

    first = sample(5)
    torch.manual_seed(123)  # the global generator does not matter once a seed is given
    assert sample(5) == first
    assert sample(6) != first
    texts = [generator.text_completion(["Hello"], max_gen_len=8, temperature=1.0, seed=9)[0]["generation"] for _ in range(2)]
    assert texts[0] == texts[1]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"seed": "abc"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**64}, r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"),
        ({"seed": -(2**63) - 1}, "seed must be an integer from"),
        ({"top_k": np.float32(2)}, "top_k"),
    ],
)
def test_bad_sampling_controls_are_refused(generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generator.generate([[1, 2]], max_gen_len=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        generator.text_completion(["hi"], max_gen_len=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        generator.chat_completion([[{"role": "user", "content": "hi"}]], max_gen_len=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        generator.stream_text_completion("hi", max_gen_len=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        generator.stream_chat_completion([{"role": "user", "content": "hi"}], max_gen_len=2, **kwargs)


def test_frequency_and_presence_penalties_by_hand():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0]])
    counts = torch.tensor([[3, 1, 0, 0]])
    # Token 0: 2.0 - 0.5 * 3 - 0.25 = 0.25; token 1: 1.5 - 0.5 - 0.25 = 0.75; unseen ones stay.
    params = SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.25)
    assert next_tokens(logits, [params], [None], counts=counts).tolist() == [2]
    lenient = SamplingParams(temperature=0, frequency_penalty=-0.5)
    assert next_tokens(torch.tensor([[1.0, 1.2]]), [lenient], [None], counts=torch.tensor([[1, 0]])).tolist() == [0]
    for bad in (2.5, float("nan"), "1"):
        with pytest.raises(ValueError, match="frequency_penalty must be a number from -2 to 2"):
            SamplingParams(frequency_penalty=bad)
        with pytest.raises(ValueError, match="presence_penalty"):
            SamplingParams(presence_penalty=bad)


def test_the_engine_counts_generated_tokens_for_the_penalties(tiny_tokenizer):
    # The script repeats token 30 with a logit of 3 (every other token 0): once generated, penalties of 2 + 2 put
    # it below the rest, and the argmax moves to token 0, then (0 penalised too) to token 1.
    llama = scripted_llama(tiny_tokenizer, [[0] * 2 + [30] * 10], max_batch_size=1)
    llama.model.margin = 3.0
    assert llama.generate([[1, 2]], max_gen_len=3, temperature=0)[0][0] == [30, 30, 30]
    engine = llama.engine
    rid = engine.add_request([1, 2], SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0), 3)
    out = {}
    while engine.has_work():
        out.update({o.request_id: o for o in engine.step() if o.finished})
    assert out[rid].completion.tokens == [30, 0, 1]
    # A later request in the same slot starts from fresh counts.
    again = engine.add_request([1, 2], SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=2.0), 2)
    while engine.has_work():
        out.update({o.request_id: o for o in engine.step() if o.finished})
    assert out[again].completion.tokens == [30, 0]


def test_a_tiny_temperature_behaves_as_greedy_and_a_tiny_penalty_is_refused():
    logits = torch.tensor([[3.0, 2.9, -1.0], [0.5, 0.7, 0.1]])
    torch.manual_seed(0)
    tiny = next_tokens(logits, [SamplingParams(temperature=1e-45, top_p=1.0)] * 2, [None, None])
    assert tiny.tolist() == [0, 1]
    for penalty in (1e-40, 1e-7, 1e7, float("inf")):
        with pytest.raises(ValueError, match="repetition_penalty must be a number from 1e-6 to 1e6"):
            SamplingParams(repetition_penalty=penalty)


def test_the_seed_range_is_the_one_torch_accepts(generator):
    """Both ends of torch's range work per call (an int beyond it was "Overflow when unpacking long long")."""
    for seed in (-(2**63), 2**64 - 1, np.uint64(2**64 - 1)):
        first = generator.generate(PROMPTS[:1], max_gen_len=4, temperature=1.0, seed=seed)[0]
        assert generator.generate(PROMPTS[:1], max_gen_len=4, temperature=1.0, seed=seed)[0] == first
    assert SamplingParams(seed=np.int64(7)).seed == 7 and type(SamplingParams(seed=np.int64(7)).seed) is int


def test_numpy_numbers_are_numbers(generator):
    """np.float32 / np.int64 arguments give what the same Python numbers give, and are kept as plain Python ones."""
    plain = dict(temperature=0.8, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=3, max_gen_len=6)
    numpy = dict(temperature=np.float32(0.8), top_p=np.float32(0.9), top_k=np.int64(5),
                 repetition_penalty=np.float16(1.1), seed=np.int32(3), max_gen_len=np.int64(6))
    numpy_prompts = [[np.int64(t) for t in p] for p in PROMPTS]
    tokens = generator.generate(numpy_prompts, stop_token_ids=[np.int64(2)], **numpy)[0]
    assert tokens == generator.generate(PROMPTS, stop_token_ids=[2], **{**plain, "temperature": float(np.float32(0.8)),
                                        "top_p": float(np.float32(0.9)), "repetition_penalty": float(np.float16(1.1))})[0]
    assert generator.text_completion(["Hello"], **numpy)[0]["generation"] == \
        generator.text_completion(["Hello"], **{**numpy, "temperature": float(np.float32(0.8))})[0]["generation"]
    params = SamplingParams(np.float32(0.5), np.float64(0.25), np.int8(3), np.float32(2), (), np.int64(1),
                            np.float32(0.5), np.int64(-1))
    assert [type(getattr(params, f)) for f in ("temperature", "top_p", "top_k", "repetition_penalty", "seed",
                                                "frequency_penalty", "presence_penalty")] == \
        [float, float, int, float, int, float, float]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=10**400)  # finite but not a float: refused, not an OverflowError
    with pytest.raises(ValueError, match="top_logprobs"):
        generator.engine.make_spec([1, 2], top_logprobs=np.float32(2))
    assert generator.engine.make_spec([1, 2], max_gen_len=np.int64(3), top_logprobs=np.int64(2)).top_logprobs == 2


def test_token_history_keeps_each_slots_tokens_through_moves_and_restarts():
    history = TokenHistory(3, 6, torch.device("cpu"))
    assert history.rows(torch.tensor([0, 1])) == (None, None)  # no table until a request needs one
    history.start(0, [1, 2, 2], SamplingParams(repetition_penalty=1.2))
    history.start(2, [3], SamplingParams(frequency_penalty=0.5))
    history.add(torch.tensor([0, 2]), torch.tensor([4, 5]))
    history.add(torch.tensor([2]), torch.tensor([5]))
    history.move(2, 1)
    seen, counts = history.rows(torch.tensor([0, 1]))
    assert seen[0].tolist() == [False, True, True, False, True, False]
    assert counts[1].tolist() == [0, 0, 0, 0, 0, 2]  # generated tokens only, as OpenAI's penalties count them
    history.start(0, [3], SamplingParams(repetition_penalty=1.2))  # a new request forgets the slot's last one
    assert history.rows(torch.tensor([0]))[0][0].tolist() == [False, False, False, True, False, False]
