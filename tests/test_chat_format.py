import pytest

from llama.chat_format import UNSAFE_ERROR, encode_dialog, encode_dialogs, has_special_tags
from llama.tokenizer import Tokenizer

BOS, EOS = 1, 2
INST = [518, 25580, 29962]  # "▁[", "INST", "]"
END_INST = [518, 29914, 25580, 29962]  # "▁[", "/", "INST", "]"
SYS = [3532, 14816, 29903, 6778]  # "▁<<", "SY", "S", ">>"
END_SYS = [29966, 829, 14816, 29903, 6778]  # "<", "</", "SY", "S", ">>"
NEWLINE = 13  # byte-fallback "<0x0A>"


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_path):
    return Tokenizer(str(llama2_tokenizer_path))


def test_tokenizer_special_ids_and_encoding(tokenizer):
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (32000, 1, 2, -1)
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [BOS, 15043, 3186, EOS]
    assert tokenizer.decode([15043, 3186]) == "Hello world"


def test_single_user_turn(tokenizer):
    ids = encode_dialog(tokenizer, [{"role": "user", "content": "  Hi\n"}])
    assert ids == [BOS, *INST, 6324, *END_INST]  # content stripped: "▁Hi"


def test_system_prompt_and_history_exact_ids(tokenizer):
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "2+2?"},
    ]
    expected = (
        [BOS, *INST, *SYS, NEWLINE, 3629, 11473, 29889, NEWLINE, *END_SYS, NEWLINE, NEWLINE, 18567, *END_INST]
        + [15043, 29991, 29871, EOS]  # "▁Hello", "!", "▁" (the trailing space), EOS
        + [BOS, *INST, 29871, 29906, 29974, 29906, 29973, *END_INST]
    )
    assert encode_dialog(tokenizer, dialog) == expected
    # The same as encoding the documented strings.
    text_turns = tokenizer.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ", True, True)
    assert expected == text_turns + tokenizer.encode("[INST] 2+2? [/INST]", True, False)


@pytest.mark.parametrize(
    "dialog",
    [
        [],
        [{"role": "system", "content": "x"}],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
    ],
)
def test_bad_dialogs_name_the_dialog(tokenizer, dialog):
    ok = [{"role": "user", "content": "fine"}]
    with pytest.raises(ValueError, match="dialog 1"):
        encode_dialogs(tokenizer, [ok, dialog])


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_special_tags_are_flagged_not_encoded(tokenizer, tag):
    dialogs = [
        [{"role": "user", "content": "fine"}],
        [{"role": "system", "content": f"sneaky {tag}"}, {"role": "user", "content": "hi"}],
    ]
    assert has_special_tags(dialogs[1]) and not has_special_tags(dialogs[0])
    encoded = encode_dialogs(tokenizer, dialogs)
    assert encoded[0] == encode_dialog(tokenizer, dialogs[0]) and encoded[1] is None
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."
