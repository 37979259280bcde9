"""Turning tokens into text deltas as they are generated."""

from typing import Callable, Iterator, List, Optional, Sequence

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Text deltas of a growing token sequence whose concatenation is decode(all tokens).

    The text is decode(all tokens) exactly, but each call decodes only the tokens since the one before, behind
    one step of context: decode(tokens[p:]) begins with decode(tokens[p:r]), since SentencePiece treats the
    first piece of both alike (its leading space dropped), so the text past r is their difference. The
    window moves on only at whole characters: a trailing U+FFFD from an unfinished multi-byte character
    (byte-fallback pieces such as <0xF0><0x9F>...) keeps it in place until the character completes. Deltas
    hold back that U+FFFD and a trailing part that could still grow into a stop string until they resolve.
    """

    def __init__(self, decode: Callable[[List[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = stop
        self._emitted = 0
        self._text = ""  # decode(tokens[:read])
        self._prefix = self._read = 0  # the window: tokens[prefix:read] are context for the tokens after them
        self._prefix_text = ""  # decode(tokens[prefix:read])

    def text(self, tokens: Sequence[int]) -> str:
        """decode(tokens), where tokens extends the sequence of the previous call."""
        if len(tokens) < self._read:  # not an extension: start over
            self._text, self._prefix, self._read, self._prefix_text = "", 0, 0, ""
        window = self._decode(list(tokens[self._prefix:]))
        if not window.startswith(self._prefix_text):  # should not happen; stay exact whatever the tokenizer does
            window, self._prefix, self._read, self._prefix_text, self._text = self._decode(list(tokens)), 0, 0, "", ""
        text = self._text + window[len(self._prefix_text):]
        if len(tokens) > self._read and not text.endswith(REPLACEMENT):
            self._prefix, self._read, self._text = self._read, len(tokens), text
            self._prefix_text = self._decode(list(tokens[self._prefix:self._read]))
        return text

    def _held_back(self, text: str) -> int:
        held = len(text) - len(text.rstrip(REPLACEMENT))
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held

    def step(self, tokens: Sequence[int]) -> str:
        """The new stable text after tokens (the whole sequence so far)."""
        return self.stable(self.text(tokens))

    def stable(self, text: str) -> str:
        """The new stable text of text, the latest text(tokens)."""
        return self.emit_until(text, len(text) - self._held_back(text))

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
