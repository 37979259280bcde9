"""From a checkpoint directory to a loaded model: which layout the directory holds, a reader for it,
and this rank's weights put into a model built on the meta device (quantized as they load, or as stored).

The layouts: Meta's (params.json + consolidated.NN.pth, llama.checkpoint), Hugging Face's
(config.json + *.safetensors or pytorch_model*.bin, llama.hf) and quantized directories that
llama.quantize.save_quantized wrote (params.json + quantization.json + quantized.NN.pt).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from llama import quantize as quantization
from llama.checkpoint import (CheckpointError, CheckpointReader, MetaCheckpoint, check_params_match, load_params,
                              load_weights, rank_plan)
from llama.distributed import model_parallel_rank, model_parallel_world_size
from llama.hf import HFCheckpoint
from llama.memory import check_memory


def open_checkpoint(ckpt_dir: Path) -> Tuple[CheckpointReader, dict]:
    """A reader for ckpt_dir's weights and its hyperparameters (params.json names): Meta's layout
    (params.json + consolidated.NN.pth) or a Hugging Face Llama directory (config.json + weights)."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(ckpt_dir)!r} does not exist; pass --ckpt_dir llama-2-7b (the folder download.sh made)")
    if (ckpt_dir / quantization.QUANTIZATION_FILE).exists():
        raise CheckpointError(
            f"{str(ckpt_dir)!r} holds quantized weights (llama.quantize.save_quantized): Llama.build loads it "
            f"as it is, but it cannot be resharded or converted; convert the original float checkpoint instead"
        )
    # Meta's shards decide; without them, config.json does (a params.json beside a Hugging Face directory's
    # weights, as some tools write, does not make it Meta's layout: there would be no shards to read).
    if not any(ckpt_dir.glob("*.pth")) and (ckpt_dir / "config.json").exists():
        reader = HFCheckpoint(ckpt_dir)
        params, file = reader.params, "config.json"
    else:
        reader = MetaCheckpoint(ckpt_dir)
        params, file = load_params(ckpt_dir), "params.json"
    check_params_match(reader, params, repr(str(ckpt_dir / file)))
    return reader, params


@dataclass
class BuildSource:
    """A directory Llama.build loads: a float checkpoint (reader set) or a quantized directory (stored set)."""

    dir: Path
    params: dict  # params.json's names
    reader: Optional[CheckpointReader] = None
    stored: Optional[dict] = None  # quantization.json, checked (llama.quantize.stored_quantization)

    @classmethod
    def open(cls, ckpt_dir: Path, scheme: Optional[quantization.QuantScheme], device: torch.device,
             dtype: torch.dtype) -> "BuildSource":
        """Open ckpt_dir, first checking that this torch has the kernels of the quantization asked for or stored."""
        stored = quantization.stored_quantization(ckpt_dir)
        if scheme is not None or stored is not None:
            quantization.check_support(scheme or stored["scheme"], device, dtype)
        if stored is not None:
            return cls(ckpt_dir, load_params(ckpt_dir), stored=stored)
        reader, params = open_checkpoint(ckpt_dir)
        return cls(ckpt_dir, params, reader=reader)

    def check_vocab(self, tokenizer_path: str, n_words: int) -> None:
        """CheckpointError unless the checkpoint's vocabulary is the tokenizer's (n_words pieces)."""
        vocab_size = self.params.get("vocab_size", -1)
        if vocab_size not in (-1, n_words):
            raise CheckpointError(
                f"{str(self.dir)!r} has vocab_size={vocab_size} but the tokenizer {str(tokenizer_path)!r} has "
                f"{n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )
        reader = self.reader
        if reader is not None and "tok_embeddings.weight" in reader.keys() and reader.shape("tok_embeddings.weight")[0] != n_words:
            raise CheckpointError(
                f"{str(self.dir)!r} has embeddings for {reader.shape('tok_embeddings.weight')[0]} tokens but the "
                f"tokenizer {str(tokenizer_path)!r} has {n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )

    def load_rank_weights(self, model: nn.Module, scheme: Optional[quantization.QuantScheme], device: torch.device,
                          dtype: torch.dtype, progress: bool = False) -> int:
        """Load this model-parallel rank's weights into model (built, and parallelized, on the meta device):
        a quantized directory as stored, else the reader's tensors, quantized as they load with a scheme.
        First checks that the KV cache of the model's max_batch_size and max_seq_len will fit on device
        (llama.memory.check_memory). Returns the bytes read."""
        world, rank = model_parallel_world_size(), model_parallel_rank()
        # The KV cache is allocated after the weights: a size that cannot fit fails now, not after the reading.
        check_memory(model.params, device, dtype, model.layers[0].attention.n_local_kv_heads if model.layers else None)
        if self.stored is not None:
            quantization.check_stored_request(self.stored, scheme, world, self.dir)
            source, plan, hook = quantization.stored_plan(model, self.dir, self.stored, rank, device, dtype)
        else:
            args = model.params
            source, plan = self.dir, rank_plan(self.reader, args.kv_heads, args.head_dim, rank, world)
            hook = None if scheme is None else quantization.QuantizeOnLoad(model, scheme, device, dtype)
        return load_weights(model, plan, source, device, dtype, hook, progress)
