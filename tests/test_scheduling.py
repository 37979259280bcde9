"""The engine's scheduling decisions (llama/scheduling.py) on their own; tests/test_engine.py runs them in the engine."""

from types import SimpleNamespace

from llama.scheduling import decode_batch, feeding_groups


def test_feeding_groups_pad_little_and_never_past_the_cache():
    def request(fed, prompt_logprobs=False):
        return SimpleNamespace(fed=fed, spec=SimpleNamespace(prompt_logprobs=prompt_logprobs))

    a, b, c, scored, near_end, f = request(0), request(0), request(0), request(0, True), request(58), request(0)
    groups = feeding_groups([(a, 10), (b, 9), (c, 3), (scored, 9), (near_end, 5), (f, 8)], cache_len=64, waste=1.25)
    # Longest first; b pads by 1 token; the scored one goes alone, and nothing joins it; near_end (at position
    # 58) padded to f's 8 would pass the cache's end; c (3) pads to 5 beside near_end: 10 <= 1.25 * 8.
    assert [[r for r, _ in g] for g in groups] == [[a, b], [scored], [f], [near_end, c]]
    # Without padding, only chunks of one length go together.
    like_b, like_c = request(0), request(3)
    groups = feeding_groups([(b, 9), (like_b, 9), (a, 10), (c, 3), (scored, 9), (f, 8), (like_c, 3)], cache_len=64, waste=1.0)
    assert [[r for r, _ in g] for g in groups] == [[a], [b, like_b], [scored], [f], [c, like_c]]


def test_decode_batch_has_a_row_per_slot_up_to_the_highest_in_use():
    def request(slot, prompt_len, generated):
        return SimpleNamespace(slot=slot, spec=SimpleNamespace(prompt=[1] * prompt_len), generated=generated)

    # Slots 0 and 2 decode (slot 1 is free or still reading its prompt); slot 3 and above are left out.
    tokens, positions, kv_len = decode_batch([request(2, 5, [7, 8]), request(0, 3, [9])], max_seq_len=64)
    assert tokens == [9, 0, 8]  # each row feeds its request's last token
    assert positions == [3, 63, 6]  # the position that token takes; the stand-in row at the cache's last one
    assert kv_len == 7  # the keys the longest real row reads
