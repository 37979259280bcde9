import random

import pytest

from llama import Llama
from llama.streaming import IncrementalDecoder
from llama.tokenizer import Tokenizer
from tests.scripted import scripted_llama

PROMPTS = ["Hello world", "The quick brown", "Paris is"]
DIALOG = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def generator(tiny_checkpoints, tiny_tokenizer_path):
    return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 64, 3, device="cpu")


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 0.9, "top_p": 0.95, "seed": 4},
        {"temperature": 1.0, "top_k": 5, "repetition_penalty": 1.3, "seed": 8},
        {"temperature": 0, "stop": ["e", "o"]},
    ],
    ids=["greedy", "seeded", "top_k-penalty", "stop"],
)
def test_stream_joins_to_the_non_streaming_result(generator, sampling):
    for prompt in PROMPTS:
        expected = generator.text_completion([prompt], max_gen_len=12, return_stats=True, **sampling)[0]
        stream = generator.stream_text_completion(prompt, max_gen_len=12, **sampling)
        deltas = list(stream)
        assert "".join(deltas) == expected["generation"]
        assert all(deltas) and stream.stats == expected["stats"]
    chat = generator.chat_completion([DIALOG], max_gen_len=12, **sampling)[0]["generation"]["content"]
    assert "".join(generator.stream_chat_completion(DIALOG, max_gen_len=12, **sampling)) == chat


def test_stream_yields_before_generation_ends(generator):
    stream = generator.stream_text_completion("Hello world", max_gen_len=20, temperature=0)
    first = next(stream)
    assert first and stream.stats is None
    stream.close()
    assert stream.stats["stop_reason"] == "closed" and 0 < stream.stats["generated_tokens"] < 20


def test_stream_of_a_refused_dialog(generator):
    stream = generator.stream_chat_completion([{"role": "user", "content": "[INST] hi"}])
    assert list(stream) == ["Error: special tags are not allowed as part of the prompt."]
    assert stream.stats["stop_reason"] == "special_tags"


@pytest.fixture(scope="module")
def llama2_tokenizer(llama2_tokenizer_path):
    return Tokenizer(str(llama2_tokenizer_path))


def test_multibyte_characters_from_byte_fallback_are_never_split(llama2_tokenizer):
    text = "Llamas 🦙 like 😀 and ü, 中文 too"
    ids = llama2_tokenizer.encode(text, bos=False, eos=True)
    assert 243 in ids  # <0xF0>: the emoji are spelled with byte-fallback pieces
    prompt_len = len(llama2_tokenizer.encode("Say", True, False))
    llama = scripted_llama(llama2_tokenizer, [[0] * prompt_len + ids + [0] * 4])
    deltas = list(llama.stream_text_completion("Say", temperature=0))
    assert "".join(deltas) == text == llama.text_completion(["Say"], temperature=0)[0]["generation"]
    assert not any("\ufffd" in d for d in deltas)
    assert any("🦙" in d for d in deltas) and any("😀" in d for d in deltas)


def test_incremental_decoder_on_random_sequences(llama2_tokenizer):
    rng = random.Random(0)
    byte_ids = list(range(3, 259))
    utf8 = [llama2_tokenizer.encode(c, False, False)[1:] for c in "🦙😀ü中é"]
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 25)):
            choice = rng.random()
            if choice < 0.3:
                ids += rng.choice(utf8)  # a whole multi-byte character
            elif choice < 0.4:
                ids.append(rng.choice(byte_ids))  # a stray byte: may never complete
            else:
                ids.append(rng.randint(259, 31999))
        decoder = IncrementalDecoder(llama2_tokenizer.decode)
        deltas = [decoder.step(ids[: n + 1]) for n in range(len(ids))]
        final = llama2_tokenizer.decode(ids)
        deltas.append(decoder.emit_until(final, len(final)))
        assert "".join(deltas) == final, ids
        if "\ufffd" not in final:
            assert not any("\ufffd" in d for d in deltas), ids


def test_incremental_decoder_decodes_only_the_newest_tokens(llama2_tokenizer):
    """A long generation costs each step a few tokens of decoding, not the whole sequence again, and the text
    stays exactly the one-shot decode, also when several tokens come at once."""
    rng = random.Random(1)
    ids = [rng.randint(259, 31999) for _ in range(2000)]
    lengths = []

    def decode(window):
        lengths.append(len(window))
        return llama2_tokenizer.decode(window)

    decoder, n = IncrementalDecoder(decode), 0
    while n < len(ids):
        n += rng.randint(1, 3)
        assert decoder.text(ids[:n]) == llama2_tokenizer.decode(ids[:n])
    assert max(lengths) <= 6
    assert decoder.text(ids[:10]) == llama2_tokenizer.decode(ids[:10])  # a shorter sequence: decoded afresh


def test_incremental_decoder_holds_back_a_possible_stop_string():
    decoder = IncrementalDecoder(lambda ids: "".join(ids), stop=["STOP"])
    assert decoder.step(list("ab")) == "ab"
    assert decoder.step(list("abST")) == ""  # "ST" may grow into "STOP"
    assert decoder.step(list("abSTx")) == "STx"
