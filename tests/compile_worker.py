"""Run under torchrun by test_compile.py: each rank saves eager and compiled greedy generations.

argv: ckpt_dir tokenizer_path out_prefix."""

import sys

import torch
import torch._dynamo.utils

from llama import Llama, compiled
from llama.distributed import global_rank

PROMPTS = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32]]


def main(ckpt_dir: str, tokenizer_path: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    # The float32 step's flex_attention (blocks of 16 keys in the 32-position cache) on oneDNN's matmuls, whatever this
    # CPU (not 8: see test_compile.test_compiled_decode_equals_eager_without_recompiling).
    compiled.CompiledDecodeStep.attention_block = 16
    compiled._onednn_matmuls = lambda model: True
    results = {}
    for compile in (False, True):
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=3, device="cpu", compile=compile)
        results[compile] = [generator.generate(p, max_gen_len=12, temperature=0, logprobs=True) for p in (PROMPTS, PROMPTS[:1])]
    torch.save({"eager": results[False], "compiled": results[True], "stats": dict(torch._dynamo.utils.counters["stats"]),
                "attention_block": generator.engine._decode._module.attention_block}, f"{out_prefix}.rank{global_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
