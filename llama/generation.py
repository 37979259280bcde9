"""Llama: build a model from a checkpoint and generate text or chat replies with it."""

import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialogs
from llama.checkpoint import CheckpointError, assign_weights, checkpoint_shards, load_params, load_shard
from llama.distributed import (
    model_parallel_rank,
    resolve_device,
    resolve_dtype,
    setup_model_parallel,
)
from llama.model import ModelArgs, Transformer
from llama.sampling import check_sampling_args, next_token, sample_top_p  # noqa: F401 (sample_top_p: reference API)
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
    ) -> "Llama":
        """Load a Meta-layout checkpoint (params.json and one consolidated.NN.pth per model-parallel rank).

        Under torchrun every process calls this; each loads its own shard. model_parallel_size
        defaults to the world size. device: "cuda", "cpu", "mps" or None for the best available.
        dtype: a torch dtype or its name; None for bfloat16 (or float16) on GPUs, float32 on CPU.
        seed seeds torch's generators on every rank, so all ranks sample the same tokens.
        """
        start = time.perf_counter()
        _check_positive_int("max_seq_len", max_seq_len)
        _check_positive_int("max_batch_size", max_batch_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        ckpt_dir = Path(ckpt_dir)
        shards = checkpoint_shards(ckpt_dir)
        params = load_params(ckpt_dir)
        tokenizer = Tokenizer(str(tokenizer_path))

        model_parallel_size = setup_model_parallel(device, model_parallel_size)
        if len(shards) != model_parallel_size:
            raise CheckpointError(
                f"{str(ckpt_dir)!r} has {len(shards)} shards, written for {len(shards)} model-parallel ranks, "
                f"but this run has {model_parallel_size}: launch it with torchrun --nproc_per_node {len(shards)} <script>"
            )
        torch.manual_seed(seed)

        vocab_size = params.get("vocab_size", -1)
        if vocab_size not in (-1, tokenizer.n_words):
            raise CheckpointError(
                f"params.json has vocab_size={vocab_size} but the tokenizer {str(tokenizer_path)!r} has "
                f"{tokenizer.n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )
        model_args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        model_args.vocab_size = tokenizer.n_words

        shard = shards[model_parallel_rank()]
        state = load_shard(shard)
        embedding = state.get("tok_embeddings.weight")
        if embedding is not None and embedding.shape[0] != tokenizer.n_words:
            raise CheckpointError(
                f"{str(shard)!r} has embeddings for {embedding.shape[0]} tokens but the tokenizer "
                f"{str(tokenizer_path)!r} has {tokenizer.n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )
        with torch.device("meta"):
            model = Transformer(model_args)
        assign_weights(model, state, shard, device, dtype)
        model.eval()
        logger.info(
            "Loaded %s in %.2f s on %s (%s), model-parallel size %d, world size %d",
            ckpt_dir, time.perf_counter() - start, device, str(dtype).removeprefix("torch."),
            model_parallel_size, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        )
        return Llama(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _check_prompts(self, prompt_tokens: List[List[int]]) -> None:
        max_seq_len = self.model.params.max_seq_len
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError(f"prompt {i} must be a list of token ids (ints), got {type(prompt).__name__}")
            if not prompt:
                raise ValueError(f"prompt {i} is empty; give at least one token (text prompts start with BOS)")
            if len(prompt) > max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, more than max_seq_len={max_seq_len}; "
                    f"shorten it or build with a larger max_seq_len"
                )
            bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {self.model.vocab_size})")

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt by at most max_gen_len tokens (fewer where max_seq_len or EOS comes first).

        Returns the new tokens of each prompt (with the prompt in front when echo) cut before EOS,
        and with logprobs the log-probability of each returned token (0.0 for an echoed first token).
        Prompts beyond max_batch_size run in successive batches.
        """
        check_sampling_args(temperature, top_p, max_gen_len)
        if max_gen_len is None:
            raise ValueError("max_gen_len must be an integer >= 1, got None")
        self._check_prompts(prompt_tokens)
        out_tokens: List[List[int]] = []
        out_logprobs: List[List[float]] = []
        batch = self.model.params.max_batch_size
        for i in range(0, len(prompt_tokens), batch):
            tokens, lps = self._generate_batch(prompt_tokens[i : i + batch], max_gen_len, temperature, top_p, logprobs, echo)
            out_tokens += tokens
            out_logprobs += lps
        return out_tokens, (out_logprobs if logprobs else None)

    def _generate_batch(
        self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float, top_p: float, logprobs: bool, echo: bool
    ) -> Tuple[List[List[int]], List[List[float]]]:
        bsz = len(prompt_tokens)
        lengths = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(lengths), max(lengths)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_prompt_len)
        device = self.device

        pad_id = self.tokenizer.pad_id
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        positions = torch.arange(total_len, device=device)
        is_prompt = positions[None, :] < torch.tensor(lengths, device=device)[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)

        prev_pos = 0
        if min_prompt_len == total_len:  # nothing to generate: score the prompts
            logits = self.model.forward(tokens, prev_pos)
            if logprobs:
                # Position i's logits predict token i + 1. (Meta's reference scores token i here, off by one.)
                token_logprobs[:, 1:] = -F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        for cur_pos in range(min_prompt_len, total_len):
            logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)
            chosen = next_token(logits[:, -1], temperature, top_p)
            # Where a longer prompt is still being read, its own token wins over the sampled one.
            chosen = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], chosen)
            tokens[:, cur_pos] = chosen
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            eos_reached |= ~is_prompt[:, cur_pos] & (chosen == self.tokenizer.eos_id)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        all_logprobs = token_logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[i]
            end = lengths[i] + max_gen_len
            toks = toks[start:end]
            probs = all_logprobs[i][start:end] if logprobs else []
            if self.tokenizer.eos_id in toks:
                cut = toks.index(self.tokenizer.eos_id)
                toks, probs = toks[:cut], probs[:cut]
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, out_logprobs

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt. Each result has "generation", and with logprobs also
        "tokens" (each token decoded alone) and "logprobs"."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
        check_sampling_args(temperature, top_p, max_gen_len)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo)
        return [self._prediction(self.tokenizer.decode(t), t, lp, logprobs) for t, lp in zip(tokens, lps or tokens)]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        """Reply to each dialog as the assistant, in the Llama 2 chat format.

        A dialog is [system?] user (assistant user)*. One whose messages contain the format's
        special tags gets the reply "Error: special tags are not allowed as part of the prompt."
        without any generation.
        """
        if not isinstance(dialogs, (list, tuple)):
            raise ValueError("dialogs must be a list of dialogs (each a list of messages)")
        check_sampling_args(temperature, top_p, max_gen_len)
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        encoded = encode_dialogs(self.tokenizer, dialogs)
        safe = [t for t in encoded if t is not None]
        tokens, lps = self.generate(safe, max_gen_len, temperature, top_p, logprobs) if safe else ([], [])
        replies = iter(zip(tokens, lps or tokens))
        predictions = []
        for prompt in encoded:
            if prompt is None:
                predictions.append(self._prediction({"role": "assistant", "content": UNSAFE_ERROR}, [], [], logprobs))
                continue
            t, lp = next(replies)
            predictions.append(self._prediction({"role": "assistant", "content": self.tokenizer.decode(t)}, t, lp, logprobs))
        return predictions

    def _prediction(self, generation, tokens: List[int], logprobs_i: List[float], logprobs: bool) -> dict:
        if not logprobs:
            return {"generation": generation}
        return {"generation": generation, "tokens": [self.tokenizer.decode(x) for x in tokens], "logprobs": logprobs_i}
