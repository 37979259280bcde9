"""Turning tokens into text deltas as they are generated."""

from typing import Callable, Iterator, List, Optional, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Text deltas of a growing token sequence whose concatenation is decode(all tokens).

    Each step decodes the whole sequence (so SentencePiece's leading-space rule applies exactly
    as in a one-shot decode) and emits only text that cannot change: trailing U+FFFD from an
    unfinished multi-byte character (byte-fallback pieces such as <0xF0><0x9F>...) and a trailing
    part that could still grow into a stop string are held back until they resolve.
    """

    def __init__(self, decode: Callable[[List[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = stop
        self._emitted = 0

    def _held_back(self, text: str) -> int:
        held = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def step(self, tokens: List[int]) -> str:
        """The new stable text after tokens (the whole sequence so far)."""
        text = self._decode(tokens)
        end = len(text) - self._held_back(text)
        return self.emit_until(text, end)

    def emit_until(self, text: str, end: int) -> str:
        """Emit text[emitted:end]; call with the final text and its length to flush."""
        if end <= self._emitted:
            return ""
        delta = text[self._emitted : end]
        self._emitted = end
        return delta


class TextStream(Iterator[str]):
    """An iterator of text deltas. After it is exhausted, stats holds prompt_tokens,
    generated_tokens and stop_reason ("eos", "length" or "stop"; "closed" after close())."""

    def __init__(self, deltas: Iterator[str]):
        self._deltas = deltas
        self.stats: Optional[dict] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        """Stop generating. Under model parallelism every rank must close at the same point."""
        self._deltas.close()
