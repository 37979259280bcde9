"""A stand-in for Transformer whose greedy continuation is a fixed script, for exact generation and engine tests."""

from typing import Callable, List, Sequence, Union

import torch

from llama import Llama, ModelArgs

Script = Union[Sequence[Sequence[int]], Callable[[List[int]], int]]


class ScriptedModel(torch.nn.Module):
    """At each position the argmax of the logits is the script's next token.

    script: a list per cache slot (script[slot][p] is the token generated at position p by the sequence
    that starts in that slot, wherever the engine moves it), or a
    function of the whole sequence so far (its tokens as stored in this model's own token "cache",
    so a token fed at the wrong position or slot changes what follows). Every forward call is
    recorded in calls as (rows, tokens per row) (each part of a forward_parts call as a call of its own,
    and the parts' calls in part_calls), each prompt chunk's length in prefills (those fed together too,
    without their padding), and each move_slot in moves.
    """

    def __init__(self, params: ModelArgs, vocab_size: int, script: Script):
        super().__init__()
        self.params, self.vocab_size, self.script = params, vocab_size, script
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.cache_shape = None
        self.calls, self.prefills, self.moves, self.part_calls = [], [], [], []
        self.margin = 10.0  # the script's logit; every other token's is 0

    def setup_cache(self):
        self.cache_shape = (self.params.max_batch_size, self.params.max_seq_len)
        self.tokens = torch.full(self.cache_shape, -1, dtype=torch.long)
        self.script_row = list(range(self.cache_shape[0]))  # the list script each slot's sequence follows

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.moves.append((src, dst, length))
        self.tokens[dst, :length] = self.tokens[src, :length]
        self.tokens[src] = -1  # what src held is gone: a read of it would show
        self.script_row[dst], self.script_row[src] = self.script_row[src], src  # a list script goes with its sequence

    def _next(self, slot: int, position: int) -> int:
        if callable(self.script):
            return self.script(self.tokens[slot, : position + 1].tolist())
        row = self.script[self.script_row[slot]]
        return row[position + 1] if position + 1 < len(row) else 0  # past the script: a stand-in row

    def forward(self, tokens, start_pos=0, slots=None, kv_len=None, last_only=False, output_index=None):
        bsz, seqlen = tokens.shape
        self.calls.append((bsz, seqlen))
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos.reshape(bsz, seqlen)
            if output_index is not None:  # prompt chunks fed together, padded to the longest
                self.prefills += [int(i) + 1 for i in output_index]
        else:
            self.prefills.append(seqlen)
            positions = torch.arange(start_pos, start_pos + seqlen).expand(bsz, seqlen)
        slots = torch.arange(bsz) if slots is None else slots
        logits = torch.zeros(bsz, seqlen, self.vocab_size)
        for row in range(bsz):
            slot = int(slots[row])
            self.tokens[slot, positions[row]] = tokens[row]
            for i in range(seqlen):
                logits[row, i, self._next(slot, int(positions[row, i]))] = self.margin
        if output_index is not None:
            return logits[torch.arange(bsz), output_index][:, None]
        return logits[:, -1:] if last_only else logits

    def forward_parts(self, parts):
        self.part_calls.append([(p.tokens.shape[0], p.tokens.shape[1]) for p in parts])
        return [self.forward(p.tokens, p.start_pos, p.slots, p.kv_len, p.last_only, p.output_index) for p in parts]


def scripted_llama(tokenizer, script: Script, max_seq_len: int = 64, max_batch_size: int = None, **engine) -> Llama:
    """A Llama that, at temperature 0, generates what script says (see ScriptedModel)."""
    slots = max_batch_size or len(script)
    params = ModelArgs(vocab_size=tokenizer.n_words, max_seq_len=max_seq_len, max_batch_size=slots)
    return Llama(ScriptedModel(params, tokenizer.n_words, script), tokenizer, **engine)
