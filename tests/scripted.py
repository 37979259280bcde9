"""A stand-in for Transformer whose greedy continuation is a fixed script, for exact generation tests."""

import torch

from llama import Llama, ModelArgs


class ScriptedModel(torch.nn.Module):
    """The logits make script[row][position] the argmax at each position (vocab_size entries)."""

    def __init__(self, params: ModelArgs, vocab_size: int, script):
        super().__init__()
        self.params, self.vocab_size, self.script = params, vocab_size, script
        self.tok_embeddings = torch.nn.Embedding(1, 1)

    def forward(self, tokens, start_pos, last_only=False):
        bsz, seqlen = tokens.shape
        logits = torch.zeros(bsz, seqlen, self.vocab_size)
        for row in range(bsz):
            for i in range(seqlen):
                logits[row, i, self.script[row][start_pos + i + 1]] = 10.0
        return logits[:, -1:] if last_only else logits


def scripted_llama(tokenizer, script, max_seq_len: int = 64) -> Llama:
    """A Llama that, at temperature 0, generates script[row][p] at position p."""
    params = ModelArgs(vocab_size=tokenizer.n_words, max_seq_len=max_seq_len, max_batch_size=len(script))
    return Llama(ScriptedModel(params, tokenizer.n_words, script), tokenizer)
