"""Random models of named shapes for the benchmarks: no weights or tokenizer needed."""

from typing import Dict

import torch

from llama.distributed import model_parallel_rank
from llama.model import ModelArgs, Transformer
from llama.parallel import parallelize

# Llama 2's published shapes, a GPT-2-small-sized one that a CPU runs in minutes, and one for tests.
SHAPES: Dict[str, dict] = {
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "multiple_of": 32},
    "134M": {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 32000, "multiple_of": 256},
    "7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 32000, "multiple_of": 256},
    "13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "vocab_size": 32000, "multiple_of": 256},
    "70B": {
        "dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
        "multiple_of": 4096, "ffn_dim_multiplier": 1.3,
    },
}


class NoTextTokenizer:
    """What generation needs of a tokenizer when it is given token ids and no stop strings.

    eos_id is -1: a generated token is an argmax index (>= 0), so it is never EOS and every row runs
    for exactly max_gen_len tokens, which keeps the work per run fixed. pad_id (-1, as Llama 2's) only
    fills positions past the prompts.
    """

    def __init__(self, n_words: int):
        self.n_words = n_words
        self.bos_id, self.eos_id, self.pad_id = 1, -1, -1

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def build_random_model(shape: str, device: torch.device, dtype: torch.dtype, max_seq_len: int,
                       max_batch_size: int, seed: int = 0) -> Transformer:
    """A Transformer of a named shape with random weights, split over the model-parallel group if one is set up.

    The model is built on the meta device, given uninitialised storage of the target dtype on the
    target device, and filled in place, so no weight exists twice or in another dtype. Each weight
    matrix is N(0, 1/in_features), the embedding N(0, 1) and the norms 1, which keeps activations
    O(1) in any dtype; the output layer is 4x larger so that greedy choices are clear-cut.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {list(SHAPES)}")
    args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **SHAPES[shape])
    with torch.device("meta"):
        model = parallelize(Transformer(args))  # fairscale's layers under a model-parallel group
    model = model.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed + 1000 * model_parallel_rank())
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or name.endswith("cache"):
                continue
            if weight.ndim == 1:  # RMSNorm
                weight.fill_(1.0)
            elif name == "tok_embeddings":
                weight.normal_(0.0, 1.0, generator=g)
            else:
                in_features = getattr(module, "in_features", weight.shape[1])
                scale = 4.0 if name == "output" else 1.0
                weight.normal_(0.0, scale * in_features ** -0.5, generator=g)
    model.setup_cache()
    return model.eval()
