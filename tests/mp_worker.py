"""Run under torchrun by test_distributed.py: each rank saves what it computed.

argv: ckpt_dir tokenizer_path out_prefix [quantize]. With quantize the model is quantized as it
loads, then saved with save_quantized to out_prefix.quantized/ and built again from there."""

import sys

import torch

from llama import Llama
from llama.distributed import global_rank
from llama.quantize import save_quantized

PROMPTS = [[1, 10, 11, 12, 13, 14, 15], [1, 20], [1, 30, 31, 32]]
LAYOUT_MODULES = ("tok_embeddings", "layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wo",
                  "layers.0.feed_forward.w1", "layers.0.feed_forward.w2", "output")


def main(ckpt_dir: str, tokenizer_path: str, out_prefix: str, quantize: str = None) -> None:
    torch.set_num_threads(1)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", seed=3, quantize=quantize)
    logits = generator.model(torch.tensor([[1, 5, 9, 33, 2, 70, 11]]), 0)
    extra = {}
    if quantize:
        saved = save_quantized(generator, f"{out_prefix}.quantized")
        reloaded = Llama.build(str(saved), tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", seed=3)
        extra["reloaded_logits"] = reloaded.model(torch.tensor([[1, 5, 9, 33, 2, 70, 11]]), 0)
    greedy = generator.generate(PROMPTS, max_gen_len=10, temperature=0, logprobs=True)
    sampled = generator.generate(PROMPTS, max_gen_len=10, temperature=1.0, top_p=0.95)[0]
    # A per-call seed with every sampling control, through the batch and the streaming paths.
    controls = {"temperature": 0.9, "top_k": 8, "repetition_penalty": 1.2, "stop": ["zz"], "seed": 11}
    seeded = generator.generate(PROMPTS, max_gen_len=10, **controls)[0]
    streamed = list(generator.stream_text_completion("Hello world", max_gen_len=10, **controls))
    model = generator.model
    attention = model.layers[0].attention
    extra["layout"] = {
        "types": {name: type(model.get_submodule(name)).__name__ for name in LAYOUT_MODULES},
        "heads": (attention.n_local_heads, attention.n_local_kv_heads),
        "shapes": {k: tuple(v.shape) for k, v in model.state_dict().items()},
    }
    torch.save({"logits": logits, "greedy": greedy, "sampled": sampled, "seeded": seeded, "streamed": streamed, **extra}, f"{out_prefix}.rank{global_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
