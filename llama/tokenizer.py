"""The Llama 2 SentencePiece tokenizer."""

import os
from pathlib import Path
from typing import List

from sentencepiece import SentencePieceProcessor

from llama.checkpoint import require_regular_file


class Tokenizer:
    """Encodes text to token ids and back with a SentencePiece model file (Llama 2's tokenizer.model)."""

    def __init__(self, model_path: str):
        require_regular_file(Path(model_path))
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
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": SentencePiece cannot take it
            raise ValueError(
                f"the text is not valid Unicode: {e.reason} at character {e.start} ({s[e.start:e.end]!r}); "
                f"remove it or decode the input with errors='replace'"
            ) from e
        tokens = self.sp_model.encode(s)
        if bos:
            tokens = [self.bos_id] + tokens
        if eos:
            tokens = tokens + [self.eos_id]
        return tokens

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes one token stands for in running text (its leading space included)."""
        piece = self.sp_model.id_to_piece(token)
        if self.sp_model.is_byte(token):  # byte fallback: "<0xE2>"
            return bytes([int(piece[3:-1], 16)])
        if self.sp_model.is_control(token) or self.sp_model.is_unknown(token):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token: int) -> str:
        """One token's text in running text; a byte that is part of a longer character reads as U+FFFD."""
        return self.token_bytes(token).decode("utf-8", errors="replace")
