"""The Llama 2 SentencePiece tokenizer."""

import os
from typing import List

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model file (Llama 2's tokenizer.model)."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model {model_path!r} not found; pass --tokenizer_path pointing at tokenizer.model"
            )
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path!r} is not a SentencePiece model file: {e}") from e
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of s, with BOS prepended and EOS appended when asked."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}")
        tokens = self.sp_model.encode(s)
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        return tokens

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)
