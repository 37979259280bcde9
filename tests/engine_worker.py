"""Run under torchrun (or alone) by test_engine.py: drive the engine with requests added at different
steps and save each request's completion, per rank.

argv: ckpt_dir out_prefix."""

import sys

import torch

from llama import Llama
from llama.distributed import global_rank
from llama.sampling import SamplingParams

# (step at which it is added, prompt, sampling, max_gen_len)
SCHEDULE = [
    (0, "Once upon a time", SamplingParams(temperature=0), 40),
    (0, "Tom had a big dog", SamplingParams(temperature=0.9, top_k=20, seed=5), 30),
    (3, "The sun was shining and", SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=9), 35),
    (7, "Lily saw a bird", SamplingParams(temperature=0), 25),
    (7, "One day", SamplingParams(temperature=0.7, seed=1), 20),
]


def main(ckpt_dir: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    generator = Llama.build(ckpt_dir, f"{ckpt_dir}/tokenizer.model", max_seq_len=128, max_batch_size=3, device="cpu")
    engine, tokenizer = generator.engine, generator.tokenizer
    engine.prefill_chunk = 4  # prompts are read over several steps, beside running requests
    ids, done, step = {}, {}, 0
    while step <= max(s for s, *_ in SCHEDULE) or engine.has_work():
        for k, (at, prompt, sampling, n) in enumerate(SCHEDULE):
            if at == step:
                ids[engine.add_request(tokenizer.encode(prompt, True, False), sampling, n, stop_token_ids=[1])] = k
        if step == 12 and global_rank() == 0:  # only rank 0 decides: the other ranks abort by its plan
            engine.abort(next(i for i, k in ids.items() if k == 0))
        for out in engine.step():
            if out.finished:
                done[ids[out.request_id]] = (out.completion.tokens, out.finish_reason)
        step += 1
    torch.save(done, f"{out_prefix}.rank{global_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
