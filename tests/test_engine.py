"""The continuous-batching engine: scheduling with a scripted model, exactness and seeds on real models."""

import threading

import pytest
import torch

from llama import Llama
from llama.engine import Engine
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer
from tests.conftest import REPO, check_exit, launch
from tests.scripted import scripted_llama

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    return Tokenizer(str(tiny_tokenizer_path))


def counting(sequence):
    """A script that continues every sequence with (its last token + 1), cycling in 10..59: what comes
    next depends on what the model was fed, at which position, in which slot."""
    return 10 + (sequence[-1] - 9) % 50


def counted(last: int, n: int):
    """The n tokens counting() generates after last."""
    out = []
    for _ in range(n):
        last = counting([last])
        out.append(last)
    return out


def run(engine: Engine):
    """Step until nothing is left; returns the list of each step's outputs."""
    steps = []
    while engine.has_work():
        steps.append(engine.step())
    return steps


def finished(steps):
    return {o.request_id: o for step in steps for o in step if o.finished}


def test_a_finished_request_frees_its_slot_for_the_next_in_the_same_step(tokenizer):
    llama = scripted_llama(tokenizer, counting, max_batch_size=2)
    engine, model = llama.engine, llama.model
    lengths = [3, 8, 4]
    ids = [engine.add_request([1, 20 + i], GREEDY, n) for i, n in enumerate(lengths)]
    steps = run(engine)
    done = finished(steps)
    for i, n in zip(ids, lengths):
        start = 20 + ids.index(i)
        assert done[i].completion.tokens == counted(start, n)
        assert done[i].finish_reason == "length"
    # Request 0 ends at step 3 (one token per step); request 2 is admitted at step 4 into its slot.
    end_step = {o.request_id: s for s, step in enumerate(steps) for o in step if o.finished}
    assert end_step[ids[0]] == 2
    admitted = next(s for s, step in enumerate(steps) if any(o.request_id == ids[2] for o in step))
    assert admitted == 3
    # Never more than two sequences at once: two prompts, then batches of two rows.
    assert all(rows <= 2 for rows, _ in model.calls)
    assert len(steps) == 8  # the longest request (8 tokens) sets the pace; the third fits beside it


def test_static_policy_admits_only_when_every_slot_is_free(tokenizer):
    llama = scripted_llama(tokenizer, counting, max_batch_size=2, policy="static")
    engine = llama.engine
    ids = [engine.add_request([1, 20 + i], GREEDY, n) for i, n in enumerate([3, 8, 4])]
    steps = run(engine)
    admitted = next(s for s, step in enumerate(steps) if any(o.request_id == ids[2] for o in step))
    assert admitted == 8  # after request 1's eighth token
    assert len(steps) == 12
    # The same tokens as the continuous policy.
    continuous = scripted_llama(tokenizer, counting, max_batch_size=2).engine
    ids_c = [continuous.add_request([1, 20 + i], GREEDY, n) for i, n in enumerate([3, 8, 4])]
    done, done_c = finished(steps), finished(run(continuous))
    assert [done[i].completion.tokens for i in ids] == [done_c[i].completion.tokens for i in ids_c]


def test_a_step_feeds_at_most_one_chunk_and_running_requests_keep_decoding(tokenizer):
    llama = scripted_llama(tokenizer, counting, max_batch_size=2, max_seq_len=64, prefill_chunk=4)
    engine, model = llama.engine, llama.model
    first = engine.add_request([1, 20], GREEDY, 12)
    engine.step()
    engine.step()
    model.prefills.clear()
    long_prompt = [1] + list(range(10, 27))  # 18 tokens: 5 chunks of at most 4
    second = engine.add_request(long_prompt, GREEDY, 3)
    steps = run(engine)
    assert model.prefills[:5] == [4, 4, 4, 4, 2]
    # Each of those steps was one forward call: the chunk and the running request's decode row as its parts.
    assert model.part_calls[-5:] == [[(1, 4), (1, 1)]] * 4 + [[(1, 2), (1, 1)]]
    # Every step while the long prompt was read also gave the running request one token.
    tokens_per_step = [sum(len(o.new_tokens) for o in step if o.request_id == first) for step in steps[:5]]
    assert tokens_per_step == [1, 1, 1, 1, 1]
    done = finished(steps)
    assert done[second].completion.tokens == counted(26, 3)
    assert len(done[first].completion.tokens) == 12


def test_a_burst_has_its_prompts_read_at_once_until_a_request_generates(tokenizer):
    """With no request generating nobody waits on the step, so it reads up to max_prefill_tokens of prompt;
    once one generates, steps read at most prefill_chunk, and a request scoring its prompt (every position's
    logits) reads at most prefill_chunk a step in any case."""
    llama = scripted_llama(tokenizer, counting, max_batch_size=4, max_seq_len=64, prefill_chunk=4)
    engine, model = llama.engine, llama.model
    engine.max_prefill_tokens = 20
    prompts = [[1] + list(range(10 * k, 10 * k + n)) for k, n in ((1, 5), (2, 7), (3, 9), (4, 3))]  # 6+8+10+4 tokens
    ids = [engine.add_request(p, GREEDY, 3) for p in prompts]
    first = engine.step()
    # 20 tokens in the first step, no request generating: the first two prompts whole, then 6 of the third.
    assert sorted(model.prefills) == [6, 6, 8] and len(model.part_calls) == 1
    assert sorted(o.request_id for o in first if o.new_tokens) == ids[:2]
    model.prefills.clear()
    second = engine.step()  # two requests generate now: 4 more of the third (one chunk), beside their decode rows
    assert model.prefills == [4] and model.part_calls[1] == [(1, 4), (2, 1)]
    done = finished([first, second] + run(engine))
    assert [done[i].completion.tokens for i in ids] == [counted(p[-1], 3) for p in prompts]
    # A request that scores its prompt: at most one chunk a step, even with nothing generating.
    scoring = engine.add_request(prompts[2], GREEDY, 1, prompt_logprobs=True)
    model.prefills.clear()
    done = finished(run(engine))
    assert model.prefills == [4, 4, 2]
    assert len(done[scoring].completion.prompt_logprobs) == len(prompts[2])


def test_abort_ends_a_running_or_waiting_request_and_ignores_others(tokenizer):
    engine = scripted_llama(tokenizer, counting, max_batch_size=1).engine
    running = engine.add_request([1, 20], GREEDY, 30)
    waiting = engine.add_request([1, 30], GREEDY, 2)
    engine.step()
    engine.abort(12345)  # unknown: nothing happens
    engine.abort(waiting)
    out = {o.request_id: o for o in engine.step()}
    assert out[waiting].finish_reason == "abort" and out[waiting].completion.tokens == []
    assert not out[running].finished and len(out[running].new_tokens) == 1
    engine.abort(running)
    out = {o.request_id: o for o in engine.step()}
    assert out[running].finish_reason == "abort" and len(out[running].completion.tokens) == 2
    assert not engine.has_work()
    engine.abort(running)  # finished: nothing happens
    assert not engine.has_work()
    # The freed slot serves the next request.
    again = engine.add_request([1, 20], GREEDY, 2)
    assert finished(run(engine))[again].completion.tokens == [21, 22]


def test_bad_requests_are_refused_before_anything_runs(tokenizer):
    engine = scripted_llama(tokenizer, counting, max_batch_size=1, max_seq_len=16).engine
    running = engine.add_request([1, 20], GREEDY, 5)
    engine.step()
    bad = [
        (([1] * 17, GREEDY, 2), {}, "prompt has 17 tokens, more than max_seq_len=16"),
        (([], GREEDY, 2), {}, "prompt is empty"),
        (([1, 10**6], GREEDY, 2), {}, "outside the vocabulary"),
        (("hello", GREEDY, 2), {}, "list of token ids"),
        (([1, 2], GREEDY, 0), {}, "max_gen_len"),
        (([1, 2], {"temperature": 0}, 2), {}, "SamplingParams"),
        (([1, 2], GREEDY, 2), {"stop_token_ids": [-1]}, "stop_token_ids"),
        (([1, 2], GREEDY, 2), {"stop_token_ids": 5}, "stop_token_ids"),
        (([1, 2], GREEDY, 2), {"top_logprobs": 50}, "top_logprobs"),
    ]
    for args, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request(*args, **kwargs)
    assert engine.num_waiting == 0 and engine.num_running == 1
    for chunk in (0, -4, 2.5, True):  # the server sets it after building; 0 fed no prompt token ever
        with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
            engine.prefill_chunk = chunk
    assert engine.prefill_chunk == 128  # the CPU default
    for tokens in (0, -1, 8.0, None):
        with pytest.raises(ValueError, match="max_prefill_tokens must be a positive integer"):
            engine.max_prefill_tokens = tokens
    assert engine.max_prefill_tokens == 8192
    for padding in (0.5, float("nan"), float("inf"), "1.25", None):
        with pytest.raises(ValueError, match="prompt_padding must be a finite number of at least 1.0"):
            engine.prompt_padding = padding
    assert engine.prompt_padding == 1.0
    assert finished(run(engine))[running].completion.tokens == [21, 22, 23, 24, 25]


def test_an_exception_in_a_step_fails_that_steps_requests_and_the_engine_goes_on(tokenizer):
    def script(sequence):
        if 90 in sequence:
            raise RuntimeError("out of memory (simulated)")
        return counting(sequence)

    engine = scripted_llama(tokenizer, script, max_batch_size=2).engine
    good = engine.add_request([1, 20], GREEDY, 3)
    doomed = engine.add_request([1, 90], GREEDY, 3)
    later = engine.add_request([1, 40], GREEDY, 2)  # waits for a slot: not in the failing step
    out = {o.request_id: o for o in engine.step()}
    assert out[doomed].finish_reason == out[good].finish_reason == "error"
    assert "out of memory" in str(out[doomed].error)
    assert engine.num_running == 0 and engine.num_waiting == 1
    done = finished(run(engine))
    assert done[later].completion.tokens == [41, 42]
    retry = engine.add_request([1, 20], GREEDY, 3)
    assert finished(run(engine))[retry].completion.tokens == [21, 22, 23]


def test_stop_token_ids_and_stop_strings_end_a_request(tokenizer):
    engine = scripted_llama(tokenizer, counting, max_batch_size=2).engine
    by_id = engine.add_request([1, 20], GREEDY, 10, stop_token_ids=[24])
    eos = engine.add_request([1, 20], GREEDY, 10, stop_token_ids=[tokenizer.eos_id])
    done = finished(run(engine))
    assert done[by_id].completion.tokens == [21, 22, 23] and done[by_id].finish_reason == "stop"
    assert len(done[eos].completion.tokens) == 10  # the counting script never produces EOS


def test_ignore_eos_generates_past_eos(tokenizer):
    def eos_after_22(sequence):  # counts up, but EOS follows 22
        return tokenizer.eos_id if sequence[-1] == 22 else counting(sequence)

    engine = scripted_llama(tokenizer, eos_after_22, max_batch_size=2).engine
    ends = engine.add_request([1, 20], GREEDY, 6)
    goes_on = engine.add_request([1, 20], GREEDY, 6, ignore_eos=True)
    done = finished(run(engine))
    assert done[ends].completion.tokens == [21, 22] and done[ends].finish_reason == "eos"
    assert done[goes_on].completion.tokens[:3] == [21, 22, tokenizer.eos_id]
    assert len(done[goes_on].completion.tokens) == 6 and done[goes_on].finish_reason == "length"
    with pytest.raises(ValueError, match="ignore_eos"):
        engine.add_request([1, 20], GREEDY, 6, ignore_eos="yes")


def test_chunked_prefill_equals_whole_prompt_prefill(tiny_checkpoints, tiny_tokenizer_path):
    whole = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 64, 3, device="cpu")
    chunked = Llama(whole.model, whole.tokenizer, prefill_chunk=3)
    chunked.engine.max_prefill_tokens = 3  # chunks of 3 also when no request generates
    prompts = [[1, 10, 11, 12, 13, 14, 15, 16, 17], [1, 20], [1, 30, 31, 32, 33], [1, 40, 41, 42, 43, 44, 45]]
    a = whole.generate(prompts, max_gen_len=10, temperature=0, logprobs=True, echo=True)
    b = chunked.generate(prompts, max_gen_len=10, temperature=0, logprobs=True, echo=True)
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_prompt_chunks_fed_together_equal_each_fed_alone(tiny_checkpoints, tiny_tokenizer_path):
    """Chunks of similar lengths go through one padded forward call (a mid-prompt one too), as they do on GPUs;
    each request gets the greedy tokens and logprobs it gets alone."""
    llama = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 64, 4, device="cpu")
    prompts = [[1] + list(range(10 + 20 * i, 10 + 20 * i + n)) for i, n in enumerate((11, 10, 9, 8))]  # 12, 11, 10, 9 tokens
    alone = [llama.generate([p], max_gen_len=8, temperature=0, logprobs=True) for p in prompts]
    together = []
    forward_parts = llama.model.forward_parts

    def recording(parts):
        together.extend(p.output_index.tolist() for p in parts if p.output_index is not None)
        return forward_parts(parts)

    llama.model.forward_parts = recording
    batched = Llama(llama.model, llama.tokenizer, prefill_chunk=24)
    assert batched.engine.prompt_padding == 1.0  # on CPU: no padding (each chunk a part of its own)
    batched.engine.prompt_padding = 1.25
    batched.engine.max_prefill_tokens = 24  # chunks of 24 also when no request generates
    batched = batched.generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
    # Step 1: 12 and 11 tokens together, 1 alone (too short to pad); step 2: 9 (from position 1) and 9 together.
    assert together == [[11, 10], [8, 8]]
    for i, (tokens, logprobs) in enumerate(alone):
        assert batched[0][i] == tokens[0]
        torch.testing.assert_close(torch.tensor(batched[1][i]), torch.tensor(logprobs[0]), atol=1e-5, rtol=0)


def test_a_request_moved_to_a_lower_slot_goes_on_as_it_would_have(tiny_checkpoints, tiny_tokenizer_path):
    """When nothing waits, a request in the highest slot moves into a lower free one (keys, values and
    penalty state with it), so decode steps shrink; its tokens are the ones it gets alone."""
    llama = Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 64, 3, device="cpu")
    prompts = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33]]
    settings = [(GREEDY, 2), (SamplingParams(temperature=0.8, seed=5), 4), (SamplingParams(temperature=0, repetition_penalty=1.3), 20)]
    alone = []
    for prompt, (sampling, n) in zip(prompts, settings):
        engine = Engine(llama.model, llama.tokenizer)
        request_id = engine.add_request(prompt, sampling, n, logprobs=True)
        alone.append(finished(run(engine))[request_id].completion)
    moves = []
    move_slot = llama.model.move_slot
    llama.model.move_slot = lambda *args: (moves.append(args), move_slot(*args))
    engine = Engine(llama.model, llama.tokenizer)
    ids = [engine.add_request(p, sampling, n, logprobs=True) for p, (sampling, n) in zip(prompts, settings)]
    done = finished(run(engine))
    # Slot 0 frees after 2 tokens: the request in slot 2 moves there (4 + 2 positions cached); slot 1 frees
    # after 4: nothing is above it then.
    assert moves == [(2, 0, 6)]
    for request_id, expected in zip(ids, alone):
        assert done[request_id].completion.tokens == expected.tokens
        torch.testing.assert_close(torch.tensor(done[request_id].completion.logprobs), torch.tensor(expected.logprobs), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def stories(stories260k):
    def build(max_batch_size):
        return Llama.build(str(stories260k), str(stories260k / "tokenizer.model"), 256, max_batch_size, device="cpu")

    build.path = stories260k
    return build


STORY_PROMPTS = ["Once upon a time", "Tom had a big dog", "The sun was shining and", "Lily saw a bird", "One day"]
MIXED = [
    {"temperature": 0},
    {"temperature": 0.9, "top_k": 20, "seed": 5},
    {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 9},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0.7, "seed": 1},
]


def test_known_greedy_story_and_bos_as_a_stop_token(stories):
    llama = Llama.build(str(stories.path), str(stories.path / "tokenizer.model"), 512, 2, device="cpu")
    out = llama.text_completion(["Once upon a time"], temperature=0, max_gen_len=400, stop_token_ids=[1], return_stats=True)[0]
    assert out["generation"].startswith(", there was a little girl named Lily")
    # The story ends with BOS after 341 tokens: a stop token, not included, and no new story after it.
    assert out["stats"] == {"prompt_tokens": 5, "generated_tokens": 341, "stop_reason": "stop"}
    assert out["generation"].endswith("You are a good friend.\"")


def test_a_seeded_request_gets_the_same_tokens_alone_or_in_any_batch(stories):
    alone = {}
    single = stories(1)
    for prompt, sampling in zip(STORY_PROMPTS, MIXED):
        alone[prompt] = single.text_completion([prompt], max_gen_len=40, **sampling)[0]["generation"]
    assert len(set(alone.values())) == len(alone)
    for slots in (2, 4):
        llama = stories(slots)
        engine = llama.engine
        # Requests of mixed settings added at different steps, so each lands in some slot beside others.
        ids = {}
        for k, (prompt, sampling) in enumerate(zip(STORY_PROMPTS[::-1], MIXED[::-1])):
            ids[engine.add_request(llama.tokenizer.encode(prompt, True, False), SamplingParams(**sampling), 40)] = prompt
            engine.step()
        done = finished(run(engine))
        assert {ids[i]: o.completion.text for i, o in done.items() if i in ids} == alone
    # One call with many prompts and a seed: each prompt's output is the one it gets alone with that seed.
    batch = stories(3).text_completion(STORY_PROMPTS, max_gen_len=30, temperature=0.9, seed=7)
    for prompt, out in zip(STORY_PROMPTS, batch):
        assert out == single.text_completion([prompt], max_gen_len=30, temperature=0.9, seed=7)[0]


def test_calls_from_threads_and_interleaved_streams_each_get_what_they_get_alone(stories):
    llama = stories(3)
    settings = [dict(max_gen_len=30, **s) for s in MIXED]
    expected = [llama.text_completion([p], **s)[0]["generation"] for p, s in zip(STORY_PROMPTS, settings)]

    results = [None] * len(STORY_PROMPTS)
    barrier = threading.Barrier(len(STORY_PROMPTS))

    def call(i):
        barrier.wait()
        results[i] = llama.text_completion([STORY_PROMPTS[i]], **settings[i])[0]["generation"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(STORY_PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected

    # Streams iterated in turns, one delta at a time, with a whole call in between.
    streams = [llama.stream_text_completion(p, **s) for p, s in zip(STORY_PROMPTS[:3], settings[:3])]
    texts = [""] * 3
    live = set(range(3))
    while live:
        for i in sorted(live):
            try:
                texts[i] += next(streams[i])
            except StopIteration:
                live.discard(i)
        if len(live) == 2:
            assert llama.text_completion([STORY_PROMPTS[4]], **settings[4])[0]["generation"] == expected[4]
    assert texts == expected[:3]
    assert not llama.engine.has_work()


def test_model_parallel_ranks_follow_rank_0s_schedule(tmp_path, stories260k):
    """Two Gloo ranks under torchrun: requests added at different steps, with an abort, give the same
    tokens on every rank as in one process."""
    out = tmp_path / "out"
    check_exit(launch([REPO / "tests" / "engine_worker.py", stories260k, f"{out}-mp"], nproc=2, timeout=600))
    check_exit(launch([REPO / "tests" / "engine_worker.py", stories260k, f"{out}-one"], timeout=300))
    one = torch.load(f"{out}-one.rank0.pt")
    assert len(one) == 5 and one[0][1] == "abort"
    for rank in range(2):
        assert torch.load(f"{out}-mp.rank{rank}.pt") == one


def test_a_hundred_prompts_run_with_at_most_max_batch_size_in_flight(tokenizer):
    llama = scripted_llama(tokenizer, counting, max_batch_size=3)
    prompts = [[1] + [10 + (7 * i) % 40] * (1 + i % 9) for i in range(100)]
    stop = [12, 30, 45]  # rows end at different steps: each stops at the first of these it counts to
    tokens, _, stats = llama.generate(prompts, max_gen_len=11, temperature=0, stop_token_ids=stop, return_stats=True)
    for p, out, st in zip(prompts, tokens, stats):
        full = counted(p[-1], 11)
        end = next((k for k, t in enumerate(full) if t in stop), 11)
        assert out == full[:end] and st["stop_reason"] == ("stop" if end < 11 else "length")
    assert 0 < sum(st["stop_reason"] == "stop" for st in stats) < 100
    assert all(rows <= 3 for rows, _ in llama.model.calls)
    # Slots refill as rows finish: about 100 * 11 / 3 decode steps, not a padded batch per chunk.
    decode_steps = sum(1 for rows, n in llama.model.calls if n == 1 and rows > 1)
    assert decode_steps <= 100 * 11 // 3 + 11


def test_step_outputs_carry_each_new_tokens_logprob(stories):
    llama = stories(2)
    engine = llama.engine
    prompt = llama.tokenizer.encode("Once upon a time", True, False)
    request = engine.add_request(prompt, GREEDY, 6, logprobs=True, top_logprobs=3)
    outputs = [o for step in run(engine) for o in step if o.request_id == request]
    streamed_tokens = [t for o in outputs for t in o.new_tokens]
    streamed_lps = [x for o in outputs for x in o.logprobs]
    done = outputs[-1].completion
    assert streamed_tokens == done.tokens and streamed_lps == done.logprobs and len(done.top_logprobs) == 6
    for token, lp, top in zip(done.tokens, done.logprobs, done.top_logprobs):
        assert len(top) == 3 and max(top, key=top.get) == token and top[token] == lp  # greedy: the likeliest
    assert "".join(o.text for o in outputs) == done.text == llama.tokenizer.decode(done.tokens)
