"""Llama: build a model from a checkpoint and generate text or chat replies with it."""

import logging
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.compiled import CompiledDecodeStep
from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialogs
from llama import quantize as quantization
from llama.checkpoint import CheckpointError, assign_weights, load_params, open_checkpoint, rank_plan
from llama.distributed import (
    global_rank,
    model_parallel_rank,
    resolve_device,
    resolve_dtype,
    setup_model_parallel,
)
from llama.hf import resolve_tokenizer_path
from llama.model import ModelArgs, Transformer
from llama.sampling import SamplingParams, check_max_gen_len, next_token, sample_top_p  # noqa: F401 (sample_top_p: reference API)
from llama.streaming import IncrementalDecoder, TextStream
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class Stats(TypedDict):
    prompt_tokens: int
    generated_tokens: int
    stop_reason: str  # "eos", "length" or "stop" ("special_tags" for a refused dialog)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # with logprobs
    logprobs: List[float]  # with logprobs
    stats: Stats  # with logprobs or return_stats


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # with logprobs
    logprobs: List[float]  # with logprobs
    stats: Stats  # with logprobs or return_stats


@dataclass
class _Row:
    """One sequence of a batch being decoded: what it generated and why it stopped."""

    prompt_len: int
    generated: List[int] = field(default_factory=list)
    stop_reason: Optional[str] = None
    text_end: Optional[int] = None  # with a stop string: where the text is cut

    def stats(self) -> Stats:
        return {"prompt_tokens": self.prompt_len, "generated_tokens": len(self.generated), "stop_reason": self.stop_reason}


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Llama:
    #: Decode steps between two reads of the new tokens by the host (None: 16 on CUDA, 1 elsewhere).
    #: Streaming and stop strings read every step.
    host_sync_every: Optional[int] = None

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        # One-token steps go through a torch.compile'd fixed-shape decode step (see llama/compiled.py).
        self._decode_step = CompiledDecodeStep(model) if compile else None

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
        compile: bool = False,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint: Meta's layout (params.json and consolidated.NN.pth shards) or a
        Hugging Face Llama directory (config.json and *.safetensors or pytorch_model*.bin).

        Under torchrun every process calls this and reads only its own slice of the weights, for
        any shard count: model_parallel_size (default: the world size) must divide n_heads and
        divide or be a multiple of n_kv_heads. device: "cuda", "cpu", "mps" or None for the best available.
        dtype: a torch dtype or its name; None for bfloat16 (or float16) on GPUs, float32 on CPU.
        seed seeds torch's generators on every rank, so all ranks sample the same tokens.
        compile=True compiles the one-token decode step with torch.compile (with CUDA graphs on
        CUDA); the first generation pays the compilation, later ones reuse it.
        quantize: None, "int8" (per-output-channel scales) or "int4" / "int4-g32" / "int4-g64" /
        "int4-g128" / "int4-g256" (grouped scales and zeros; "int4" is group 128) quantizes the
        attention and feed-forward weights as they load, each rank its own slices; embeddings, the
        output layer and the norms stay in dtype. Runs on CPU and CUDA (int4 on CUDA needs bfloat16).
        A directory written by llama.quantize.save_quantized loads as stored (quantize None or
        equal to its scheme) on as many ranks as it has shards. See llama/quantize.py.
        """
        start = time.perf_counter()
        _check_positive_int("max_seq_len", max_seq_len)
        _check_positive_int("max_batch_size", max_batch_size)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        scheme = quantization.parse_quantize(quantize)
        ckpt_dir = Path(ckpt_dir)
        stored = quantization.stored_quantization(ckpt_dir)
        if scheme is not None or stored is not None:
            quantization.check_support(scheme or stored["scheme"], device, dtype)
        reader, params = (None, load_params(ckpt_dir)) if stored else open_checkpoint(ckpt_dir)
        tokenizer = Tokenizer(resolve_tokenizer_path(str(tokenizer_path)))

        model_parallel_size = setup_model_parallel(device, model_parallel_size)
        torch.manual_seed(seed)

        vocab_size = params.get("vocab_size", -1)
        if vocab_size not in (-1, tokenizer.n_words):
            raise CheckpointError(
                f"{str(ckpt_dir)!r} has vocab_size={vocab_size} but the tokenizer {str(tokenizer_path)!r} has "
                f"{tokenizer.n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )
        if reader is not None and "tok_embeddings.weight" in reader.keys() and reader.shape("tok_embeddings.weight")[0] != tokenizer.n_words:
            raise CheckpointError(
                f"{str(ckpt_dir)!r} has embeddings for {reader.shape('tok_embeddings.weight')[0]} tokens but the "
                f"tokenizer {str(tokenizer_path)!r} has {tokenizer.n_words} pieces; use the tokenizer.model that came with this checkpoint"
            )
        model_args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params)
        model_args.vocab_size = tokenizer.n_words
        with torch.device("meta"):
            model = Transformer(model_args)
        rank = model_parallel_rank()
        if stored is not None:
            quantization.check_stored_request(stored, scheme, model_parallel_size, ckpt_dir)
            bytes_read = quantization.load_quantized(model, ckpt_dir, stored, rank, device, dtype)
        else:
            plan = rank_plan(reader, model_args.kv_heads, model_args.head_dim, rank, model_parallel_size)
            if scheme is not None:
                bytes_read = quantization.load_and_quantize(model, plan, ckpt_dir, device, dtype, scheme, progress=global_rank() == 0)
            else:
                bytes_read = assign_weights(model, plan, ckpt_dir, device, dtype, progress=global_rank() == 0)
        model.eval()
        logger.info(
            "Loaded %s (%.2f GB read by this rank) in %.2f s on %s (%s), model-parallel size %d, world size %d",
            ckpt_dir, bytes_read / 1e9, time.perf_counter() - start, device, str(dtype).removeprefix("torch."),
            model_parallel_size, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        )
        return Llama(model, tokenizer, compile=compile)

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

    @torch.no_grad()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ):
        """Continue each prompt by at most max_gen_len tokens (fewer where max_seq_len, EOS or a stop string comes first).

        Returns (tokens, logprobs): the new tokens of each prompt (after the prompt when echo),
        without the EOS, and with logprobs=True the log-probability of each returned token (0.0 for
        an echoed first token), else None. With a stop string the tokens end with the one that
        completes the text before it. return_stats=True adds a third list: per prompt, a dict of
        prompt_tokens, generated_tokens and stop_reason ("eos", "length" or "stop").
        Prompts beyond max_batch_size run in successive batches. See SamplingParams for the
        sampling arguments.
        """
        if max_gen_len is None:
            raise ValueError("max_gen_len must be an integer >= 1, got None")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        rows, lps = self._generate(prompt_tokens, max_gen_len, sampling, logprobs, echo)
        tokens = [(p if echo else []) + row.generated for p, row in zip(prompt_tokens, rows)]
        result = (tokens, lps if logprobs else None)
        return result + ([row.stats() for row in rows],) if return_stats else result

    def _generate(self, prompt_tokens, max_gen_len, sampling, logprobs, echo) -> Tuple[List[_Row], List[List[float]]]:
        """Check the request, then decode it in batches of max_batch_size."""
        check_max_gen_len(max_gen_len)
        self._check_prompts(prompt_tokens)
        rows: List[_Row] = []
        lps: List[List[float]] = []
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(sampling.seed)
        batch = self.model.params.max_batch_size
        for i in range(0, len(prompt_tokens), batch):
            steps = self._decode(prompt_tokens[i : i + batch], max_gen_len, sampling, logprobs, generator,
                                 self._host_sync_interval(sampling))
            batch_rows, token_logprobs = _run_to_end(steps)
            rows += batch_rows
            for row, row_lps in zip(batch_rows, token_logprobs):
                lps.append(row_lps[0 if echo else row.prompt_len : row.prompt_len + len(row.generated)])
        return rows, lps

    def _decode(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        sampling: SamplingParams,
        logprobs: bool,
        generator: Optional[torch.Generator],
        sync_every: int,
    ) -> Iterator[List[_Row]]:
        """Decode one batch, yielding its rows every sync_every steps; returns (rows, per-position logprobs).

        Decoding starts at the shortest prompt; where a longer prompt is still being read its own
        token is kept. A row stops at EOS, a stop string or max_gen_len; the batch when all have.
        """
        bsz = len(prompt_tokens)
        rows = [_Row(len(t)) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(r.prompt_len for r in rows), max(r.prompt_len for r in rows)
        total_len = min(self.model.params.max_seq_len, max_gen_len + max_prompt_len)
        device = self.device

        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        lengths = torch.tensor([r.prompt_len for r in rows], device=device)
        is_prompt = torch.arange(total_len, device=device)[None, :] < lengths[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device) if logprobs else None
        seen = None
        if sampling.repetition_penalty != 1.0:
            # Tokens each sequence holds so far; positions past min_prompt_len join as they are reached.
            seen = torch.zeros((bsz, self.model.vocab_size), dtype=torch.bool, device=device)
            seen.scatter_(1, tokens[:, :min_prompt_len], True)

        # On CUDA the host reads the new tokens every few steps, not every step, so the GPU is never left
        # waiting for the host to look at a token before it may start the next step. Steps run past the
        # batch's end are discarded, and the random generator is put back as it was after the last
        # needed step, so outputs and the generator's later draws are those of checking every step.
        rng = _generator_in_use(generator, device) if sync_every > 1 and sampling.temperature > 0 else None
        rng_states = []
        prev_pos, synced = 0, min_prompt_len
        if min_prompt_len == total_len:  # nothing to generate: score the prompts
            for row in rows:
                row.stop_reason = "length"
            logits = self.model.forward(tokens, prev_pos)
            if logprobs:
                # Position i's logits predict token i + 1. (Meta's reference scores token i here, off by one.)
                token_logprobs[:, 1:] = -F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
        for cur_pos in range(min_prompt_len, total_len):
            if self._decode_step is not None and cur_pos - prev_pos == 1:
                # Fresh tensors with the same strides at every step: a column of `tokens` would carry its
                # row stride (total_len), and a new stride makes torch.compile compile the step again.
                step_tokens = tokens[:, prev_pos].reshape(bsz, 1).clone(memory_format=torch.contiguous_format)
                positions = torch.full((bsz,), prev_pos, dtype=torch.long, device=device)
                logits = self._decode_step(step_tokens, positions, cur_pos)[:, None]
            else:
                logits = self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos, last_only=not logprobs)
            chosen = next_token(logits[:, -1], sampling, seen, generator)
            chosen = torch.where(is_prompt[:, cur_pos], tokens[:, cur_pos], chosen)
            tokens[:, cur_pos] = chosen
            if seen is not None:
                seen[torch.arange(bsz, device=device), chosen] = True
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            prev_pos = cur_pos
            if rng is not None:
                rng_states.append(rng.get_state())
            if cur_pos + 1 - synced < sync_every and cur_pos + 1 < total_len:
                continue
            for step, (pos, column) in enumerate(zip(range(synced, cur_pos + 1), tokens[:, synced : cur_pos + 1].T.tolist())):
                for row, token in zip(rows, column):
                    if row.stop_reason is None and pos >= row.prompt_len:
                        self._append(row, token, max_gen_len, sampling.stop)
                if all(row.stop_reason for row in rows):
                    if rng is not None:
                        rng.set_state(rng_states[step])
                    break
            synced, rng_states = cur_pos + 1, []
            yield rows
            if all(row.stop_reason for row in rows):
                break
        for row in rows:
            row.stop_reason = row.stop_reason or "length"
        return rows, (token_logprobs.tolist() if logprobs else [[] for _ in rows])

    def _host_sync_interval(self, sampling: SamplingParams) -> int:
        """How many steps run between two looks of the host at the new tokens."""
        if sampling.stop:
            return 1  # a stop string may end a row at any token
        if self.host_sync_every is not None:
            return self.host_sync_every
        return 16 if self.device.type == "cuda" else 1  # reading a CPU tensor costs nothing

    def _append(self, row: _Row, token: int, max_gen_len: int, stop: Tuple[str, ...]) -> None:
        """Add a newly generated token to row, and note whether the row is done."""
        if token == self.tokenizer.eos_id:
            row.stop_reason = "eos"
            return
        row.generated.append(token)
        if stop:
            text = self.tokenizer.decode(row.generated)
            found = [i for i in (text.find(s) for s in stop) if i >= 0]
            if found:
                row.stop_reason, row.text_end = "stop", min(found)
                # Keep only the tokens needed to spell the text before the stop string.
                while len(row.generated) > 1 and len(self.tokenizer.decode(row.generated[:-1])) >= row.text_end:
                    row.generated.pop()
                return
        if len(row.generated) == max_gen_len:
            row.stop_reason = "length"

    def _text(self, row: _Row, prefix: List[int] = ()) -> str:
        """The row's text, after prefix tokens (decoded together, so the space between them stays)."""
        text = self.tokenizer.decode(list(prefix) + row.generated)
        if row.text_end is None:
            return text
        after_stop = len(self.tokenizer.decode(row.generated)) - row.text_end
        return text[: len(text) - after_stop]

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        *,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt. Each result has "generation"; with logprobs=True also "tokens"
        (each token decoded alone) and "logprobs"; with logprobs or return_stats also "stats"."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        max_gen_len = self._default_gen_len(max_gen_len)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        rows, lps = self._generate(prompt_tokens, max_gen_len, sampling, logprobs, echo)
        results = []
        for p_tokens, row, row_lps in zip(prompt_tokens, rows, lps):
            text = self._text(row, p_tokens if echo else [])
            tokens = (p_tokens if echo else []) + row.generated
            results.append(self._prediction(text, tokens, row_lps, row.stats(), logprobs, return_stats))
        return results

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        *,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ) -> List[ChatPrediction]:
        """Reply to each dialog as the assistant, in the Llama 2 chat format.

        A dialog is [system?] user (assistant user)*. One whose messages contain the format's
        special tags gets the reply "Error: special tags are not allowed as part of the prompt."
        without any generation. Results are shaped as in text_completion.
        """
        if not isinstance(dialogs, (list, tuple)):
            raise ValueError("dialogs must be a list of dialogs (each a list of messages)")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        max_gen_len = self._default_gen_len(max_gen_len)
        encoded = encode_dialogs(self.tokenizer, dialogs)
        safe = [t for t in encoded if t is not None]
        rows, lps = self._generate(safe, max_gen_len, sampling, logprobs, False) if safe else ([], [])
        replies = iter(zip(rows, lps))
        predictions = []
        for prompt in encoded:
            if prompt is None:
                refused: Stats = {"prompt_tokens": 0, "generated_tokens": 0, "stop_reason": "special_tags"}
                message = {"role": "assistant", "content": UNSAFE_ERROR}
                predictions.append(self._prediction(message, [], [], refused, logprobs, return_stats))
                continue
            row, row_lps = next(replies)
            message = {"role": "assistant", "content": self._text(row)}
            predictions.append(self._prediction(message, row.generated, row_lps, row.stats(), logprobs, return_stats))
        return predictions

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> TextStream:
        """Complete one prompt, yielding text deltas as tokens are produced.

        The deltas join to text_completion([prompt], ...)[0]["generation"] for the same settings
        and seed. After the stream ends, its .stats holds the token counts and stop reason.
        Under model parallelism every rank iterates the stream in step.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        return self._stream(self.tokenizer.encode(prompt, bos=True, eos=False), max_gen_len, sampling)

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        *,
        top_k: Optional[int] = None,
        repetition_penalty: float = 1.0,
        stop: Optional[Sequence[str]] = None,
        seed: Optional[int] = None,
    ) -> TextStream:
        """Reply to one dialog, yielding text deltas as tokens are produced (see stream_text_completion).

        A dialog carrying the chat format's special tags yields the refusal message at once.
        """
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        (prompt_tokens,) = encode_dialogs(self.tokenizer, [dialog])
        if prompt_tokens is None:
            stream = TextStream(iter([UNSAFE_ERROR]))
            stream.stats = {"prompt_tokens": 0, "generated_tokens": 0, "stop_reason": "special_tags"}
            return stream
        return self._stream(prompt_tokens, max_gen_len, sampling)

    def _stream(self, prompt_tokens: List[int], max_gen_len: Optional[int], sampling: SamplingParams) -> TextStream:
        max_gen_len = self._default_gen_len(max_gen_len)
        check_max_gen_len(max_gen_len)
        self._check_prompts([prompt_tokens])
        generator = None if sampling.seed is None else torch.Generator(self.device).manual_seed(sampling.seed)
        decoder = IncrementalDecoder(self.tokenizer.decode, sampling.stop)

        def deltas() -> Iterator[str]:
            steps = self._decode([prompt_tokens], max_gen_len, sampling, False, generator, sync_every=1)
            row = _Row(len(prompt_tokens))
            try:
                while True:
                    with torch.no_grad():
                        try:
                            (row,) = next(steps)
                        except StopIteration as done:
                            (row,), _ = done.value
                            break
                    if row.stop_reason is None:
                        delta = decoder.step(row.generated)
                        if delta:
                            yield delta
                text = self._text(row)
                delta = decoder.emit_until(text, len(text))
                if delta:
                    yield delta
            finally:
                stats = row.stats()
                if row.stop_reason is None:
                    stats["stop_reason"] = "closed"
                stream.stats = stats

        stream = TextStream(deltas())
        return stream

    def _default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def _prediction(self, generation, tokens, logprobs_i, stats, logprobs: bool, return_stats: bool) -> dict:
        prediction = {"generation": generation}
        if logprobs:
            prediction["tokens"] = [self.tokenizer.decode(x) for x in tokens]
            prediction["logprobs"] = logprobs_i
        if logprobs or return_stats:
            prediction["stats"] = stats
        return prediction


def _generator_in_use(generator: Optional[torch.Generator], device: torch.device) -> torch.Generator:
    """The generator sampling draws from: the call's own, or the device's default one."""
    if generator is not None:
        return generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "mps":
        return torch.mps._get_default_mps_generator()
    return torch.default_generator


def _run_to_end(steps):
    """Exhaust a generator and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
