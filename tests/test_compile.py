"""torch.compile'd decoding (CPU inductor here): same outputs as eager, one graph for every step."""

import torch
import torch._dynamo.utils

from llama import Llama


def test_compiled_decode_equals_eager_without_recompiling(tiny_checkpoints, tiny_tokenizer_path):
    def build(compile):
        return Llama.build(str(tiny_checkpoints[(2, 1)]), str(tiny_tokenizer_path), 48, 3, device="cpu", compile=compile)

    eager, compiled = build(False), build(True)
    prompts = [[1, 10, 11, 12, 13], [1, 20], [1, 30, 31, 32]]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = eager.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    got = compiled.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    again = compiled.generate([p[::-1] for p in prompts], max_gen_len=6, temperature=0)
    assert got[0] == expected[0]
    for a, b in zip(got[1], expected[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    assert again[0] == eager.generate([p[::-1] for p in prompts], max_gen_len=6, temperature=0)[0]
    # Every decode step of both calls ran the one graph compiled at the first step.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
