import pytest

from llama.tokenizer import Tokenizer


def test_tiny_tokenizer_round_trip_and_llama_special_ids(tiny_tokenizer_path):
    tok = Tokenizer(str(tiny_tokenizer_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    ids = tok.encode("Hello world", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids[1:-1]) == "Hello world"
    assert tok.encode("", bos=True, eos=False) == [tok.bos_id]


def test_missing_and_invalid_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(bad))


def test_encode_takes_only_text(tiny_tokenizer_path):
    with pytest.raises(TypeError, match="str"):
        Tokenizer(str(tiny_tokenizer_path)).encode(b"bytes", bos=True, eos=False)


def test_text_that_is_not_valid_unicode_is_a_clear_value_error(tiny_tokenizer_path):
    tokenizer = Tokenizer(str(tiny_tokenizer_path))
    with pytest.raises(ValueError, match=r"not valid Unicode: surrogates not allowed at character 3 \('\\ud800'\)"):
        tokenizer.encode("abc\ud800def", bos=True, eos=False)


def test_token_text_and_bytes_spell_the_running_text(llama2_tokenizer_path):
    tokenizer = Tokenizer(str(llama2_tokenizer_path))
    text = "Hello world, llamas 🦙!\nBye"
    ids = tokenizer.encode(text, bos=True, eos=False)
    assert tokenizer.token_bytes(ids[0]) == b""  # BOS
    assert b"".join(tokenizer.token_bytes(t) for t in ids).decode("utf-8") == " " + text  # SentencePiece's leading space
    assert tokenizer.token_text(ids[1]) == " Hello"
