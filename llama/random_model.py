"""Random models of named shapes for the benchmarks (no weights or tokenizer needed), their stand-in tokenizer, and
a stand-in SentencePiece file of any vocabulary size for llama.cpp's converter."""

import struct
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


# A stand-in SentencePiece file: llama.cpp's GGUF converter needs a tokenizer.model to write the vocabulary; the
# benchmark feeds token ids and never text, so any vocabulary of the model's size does. This writes one without
# protobuf (which sentencepiece's own model writer needs and the project does not depend on): the wire format of
# sentencepiece_model.proto's ModelProto, the fields llama.cpp reads.

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # ModelProto.SentencePiece.Type
_BPE = 2  # TrainerSpec.ModelType, as Llama 2's
STAND_IN_MIN_VOCAB = 3 + 256  # <unk> <s> </s> and the 256 byte pieces llama.cpp looks up (<0x0A> for newline)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: wire type 0 (varint, payload already encoded), 2 (length-delimited) or 5 (32-bit)."""
    key = _varint(number << 3 | wire_type)
    return key + (_varint(len(payload)) + payload if wire_type == 2 else payload)


def stand_in_tokenizer(vocab_size: int) -> bytes:
    """A SentencePiece model of vocab_size pieces: <unk>, <s> (1), </s> (2) as Llama 2's, the 256 byte pieces, then
    placeholder words."""
    if vocab_size < STAND_IN_MIN_VOCAB:
        raise ValueError(f"a stand-in tokenizer needs at least {STAND_IN_MIN_VOCAB} pieces, not {vocab_size}")
    pieces = [("<unk>", 0.0, _UNKNOWN), ("<s>", 0.0, _CONTROL), ("</s>", 0.0, _CONTROL)]
    pieces += [(f"<0x{b:02X}>", 0.0, _BYTE) for b in range(256)]
    pieces += [(f"\u2581w{i}", -float(i), _NORMAL) for i in range(vocab_size - len(pieces))]
    model = b"".join(
        _field(1, 2, _field(1, 2, text.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind)))
        for text, score, kind in pieces
    )
    # trainer_spec (2): model_type (3), vocab_size (4), byte_fallback (35).
    trainer = _field(3, 0, _varint(_BPE)) + _field(4, 0, _varint(vocab_size)) + _field(35, 0, _varint(1))
    return model + _field(2, 2, trainer)
