"""Llama: build a model from a checkpoint and generate text or chat replies with it."""

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Deque, Dict, Iterable, Iterator, List, Optional, Sequence, TypedDict, Union

import torch

from llama.compiled import CompiledDecodeStep
from llama.checks import check_positive_int, check_seed
from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialogs
from llama import quantize as quantization
from llama.device import resolve_device, resolve_dtype
from llama.distributed import global_rank, setup_model_parallel
from llama.hf import resolve_tokenizer_path
from llama.loading import BuildSource
from llama.model import ModelArgs, Transformer
from llama.parallel import parallelize
from llama.engine import Engine
from llama.request import Completion, RequestSpec, StepOutput
from llama.sampling import SamplingParams, sample_top_p  # noqa: F401 (sample_top_p: reference API)
from llama.streaming import TextStream
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


class Llama:
    """A model and its tokenizer, generating through a continuous-batching Engine (llama/engine.py).

    Calls from several threads, and streams iterated in turns, are requests in one queue: each gets
    what it would get alone. Whoever waits for a result steps the engine for everyone.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False, *,
                 prefill_chunk: Optional[int] = None, policy: str = "continuous"):
        self.model = model
        self.tokenizer = tokenizer
        if model.cache_shape is None:
            model.setup_cache()
        # One-token steps go through a torch.compile'd fixed-shape decode step (see llama/compiled.py).
        self.decode_step = CompiledDecodeStep(model) if compile else None
        self.engine = Engine(model, tokenizer, prefill_chunk=prefill_chunk, policy=policy, decode=self.decode_step)
        self._lock = threading.Lock()
        self._inbox: Dict[int, Deque[StepOutput]] = {}  # outputs of requests someone waits for

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
        seed (an integer from -2**63 to 2**64 - 1) seeds torch's generators on every rank, so all ranks
        sample the same tokens.
        compile=True compiles the one-token decode step with torch.compile (with CUDA graphs on
        CUDA); the first generation pays the compilation, later ones reuse it.
        quantize: None, "int8" (per-output-channel scales), "w8a8" (the same weights, and each
        token's input to a layer quantized to int8 too: CPU only, fastest there) or "int4" /
        "int4-g32" / "int4-g64" / "int4-g128" / "int4-g256" (grouped scales and zeros; "int4" is
        group 128) quantizes the attention and feed-forward weights as they load, each rank its own
        slices, and the output layer with 8 bits under every scheme; embeddings and norms stay in
        dtype. Runs on CPU and CUDA (int4 on CUDA needs bfloat16).
        A directory written by llama.quantize.save_quantized loads as stored (quantize None or
        equal to its scheme) on as many ranks as it has shards. See llama/quantize.py.
        """
        start = time.perf_counter()
        max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        max_batch_size = check_positive_int("max_batch_size", max_batch_size)
        seed = check_seed(seed)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        scheme = quantization.parse_quantize(quantize)
        source = BuildSource.open(Path(ckpt_dir), scheme, device, dtype)
        tokenizer = Tokenizer(resolve_tokenizer_path(str(tokenizer_path)))

        model_parallel_size = setup_model_parallel(device, model_parallel_size)
        torch.manual_seed(seed)

        source.check_vocab(tokenizer_path, tokenizer.n_words)
        model_args = ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **source.params)
        model_args.vocab_size = tokenizer.n_words
        with torch.device("meta"):
            model = parallelize(Transformer(model_args))
        bytes_read = source.load_rank_weights(model, scheme, device, dtype, progress=global_rank() == 0)
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
        stop_token_ids: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ):
        """Continue each prompt by at most max_gen_len tokens (fewer where max_seq_len, EOS, a stop token
        id or a stop string comes first).

        Returns (tokens, logprobs): the new tokens of each prompt (after the prompt when echo),
        without the EOS or stop token, and with logprobs=True the log-probability of each returned
        token (0.0 for an echoed first token), else None. With a stop string the tokens end with the
        one that completes the text before it. return_stats=True adds a third list: per prompt, a
        dict of prompt_tokens, generated_tokens and stop_reason ("eos", "length" or "stop").
        At most max_batch_size prompts run at once; each finished one makes room for the next.
        With a seed, each prompt gets the tokens it gets alone with that seed. See SamplingParams
        for the sampling arguments.
        """
        if max_gen_len is None:
            raise ValueError("max_gen_len must be an integer >= 1, got None")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        prompt_tokens = _materialise(prompt_tokens, "prompt_tokens", "a list of token-id lists")
        specs = [self._spec(p, sampling, max_gen_len, stop_token_ids, logprobs, echo, f"prompt {i}")
                 for i, p in enumerate(prompt_tokens)]
        done = self._run(specs)
        tokens = [(s.prompt if echo else []) + c.tokens for s, c in zip(specs, done)]
        lps = [(c.prompt_logprobs if echo else []) + c.logprobs for c in done]
        result = (tokens, lps if logprobs else None)
        return result + ([c.stats() for c in done],) if return_stats else result

    def _spec(self, prompt, sampling, max_gen_len, stop_token_ids, logprobs, echo, name) -> RequestSpec:
        return self.engine.make_spec(prompt, sampling, max_gen_len, stop_token_ids=stop_token_ids,
                                     logprobs=logprobs, prompt_logprobs=logprobs and echo, name=name)

    # Running requests on the engine -----------------------------------------------------------------

    def _submit(self, specs: List[RequestSpec]) -> List[int]:
        with self._lock:
            ids = [self.engine.add_spec(s) for s in specs]
            for i in ids:
                self._inbox[i] = deque()
            return ids

    def _outputs(self, ids: List[int]) -> Iterator[StepOutput]:
        """The StepOutputs of these requests as they come. While none is pending the caller steps the
        engine (for every request in it). Closing the iterator early aborts the unfinished ones; a
        request that failed raises its error."""
        pending = set(ids)
        try:
            while pending:
                with self._lock:
                    if not any(self._inbox[i] for i in pending):
                        for out in self.engine.step():
                            if out.request_id in self._inbox:
                                self._inbox[out.request_id].append(out)
                    ready = [self._inbox[i].popleft() for i in ids if i in pending for _ in range(len(self._inbox[i]))]
                for out in ready:
                    if out.error is not None:
                        raise out.error
                    if out.finished:
                        pending.discard(out.request_id)
                        del self._inbox[out.request_id]
                    yield out
        finally:
            with self._lock:
                for i in pending:
                    self.engine.abort(i)
                    self._inbox.pop(i, None)

    def run_requests(self, specs: List[RequestSpec]) -> List[Completion]:
        """Run engine requests (made with self.engine.make_spec) to their ends, in the one queue shared with
        every other caller; their Completions, in order. A request that fails raises its error."""
        return self._run(list(specs))

    def _run(self, specs: List[RequestSpec]) -> List[Completion]:
        """Run the requests to their ends; their Completions in order."""
        if not specs:
            return []
        ids = self._submit(specs)
        done = {out.request_id: out.completion for out in self._outputs(ids) if out.finished}
        return [done[i] for i in ids]

    def _text(self, completion: Completion, prefix: List[int] = ()) -> str:
        """The completion's text, after prefix tokens (decoded together, so the space between them stays)."""
        if not prefix:
            return completion.text
        text = self.tokenizer.decode(list(prefix) + completion.tokens)
        after_stop = len(self.tokenizer.decode(completion.tokens)) - len(completion.text)
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
        stop_token_ids: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt. Each result has "generation"; with logprobs=True also "tokens"
        (each token decoded alone) and "logprobs"; with logprobs or return_stats also "stats"."""
        prompts = _materialise(prompts, "prompts", "a list of strings (wrap a single prompt in a list)")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings (wrap a single prompt in a list)")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        specs = [self._spec(p, sampling, max_gen_len, stop_token_ids, logprobs, echo, f"prompt {i}")
                 for i, p in enumerate(prompt_tokens)]
        results = []
        for spec, done in zip(specs, self._run(specs)):
            text = self._text(done, spec.prompt if echo else [])
            tokens = (spec.prompt if echo else []) + done.tokens
            lps = (done.prompt_logprobs if echo else []) + done.logprobs
            results.append(self._prediction(text, tokens, lps, done.stats(), logprobs, return_stats))
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
        stop_token_ids: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
        return_stats: bool = False,
    ) -> List[ChatPrediction]:
        """Reply to each dialog as the assistant, in the Llama 2 chat format.

        A dialog is [system?] user (assistant user)*. One whose messages contain the format's
        special tags gets the reply "Error: special tags are not allowed as part of the prompt."
        without any generation. Results are shaped as in text_completion.
        """
        dialogs = _materialise(dialogs, "dialogs", "a list of dialogs (each a list of messages)")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        encoded = encode_dialogs(self.tokenizer, dialogs)
        specs = {i: self._spec(p, sampling, max_gen_len, stop_token_ids, logprobs, False, f"dialog {i}")
                 for i, p in enumerate(encoded) if p is not None}
        replies = dict(zip(specs, self._run(list(specs.values()))))
        predictions = []
        for i in range(len(encoded)):
            if i not in replies:
                refused: Stats = {"prompt_tokens": 0, "generated_tokens": 0, "stop_reason": "special_tags"}
                message = {"role": "assistant", "content": UNSAFE_ERROR}
                predictions.append(self._prediction(message, [], [], refused, logprobs, return_stats))
                continue
            done = replies[i]
            message = {"role": "assistant", "content": done.text}
            predictions.append(self._prediction(message, done.tokens, done.logprobs, done.stats(), logprobs, return_stats))
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
        stop_token_ids: Optional[Sequence[int]] = None,
        seed: Optional[int] = None,
    ) -> TextStream:
        """Complete one prompt, yielding text deltas as tokens are produced.

        The deltas join to text_completion([prompt], ...)[0]["generation"] for the same settings
        and seed. After the stream ends, its .stats holds the token counts and stop reason.
        Generation starts at the first next(); streams iterated in turns share the engine's steps.
        Under model parallelism every rank iterates the stream in step.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        sampling = SamplingParams(temperature, top_p, top_k, repetition_penalty, stop, seed)
        prompt_tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        return self._stream(self._spec(prompt_tokens, sampling, max_gen_len, stop_token_ids, False, False, "prompt"))

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
        stop_token_ids: Optional[Sequence[int]] = None,
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
        return self._stream(self._spec(prompt_tokens, sampling, max_gen_len, stop_token_ids, False, False, "dialog"))

    def _stream(self, spec: RequestSpec) -> TextStream:
        def deltas() -> Iterator[str]:
            stats = {"prompt_tokens": len(spec.prompt), "generated_tokens": 0, "stop_reason": "closed"}
            try:
                for out in self._outputs(self._submit([spec])):
                    stats["generated_tokens"] += len(out.new_tokens)
                    if out.finished:
                        stats = out.completion.stats()
                    if out.text:
                        yield out.text
            finally:
                stream.stats = stats

        stream = TextStream(deltas())
        return stream

    def _prediction(self, generation, tokens, logprobs_i, stats, logprobs: bool, return_stats: bool) -> dict:
        prediction = {"generation": generation}
        if logprobs:
            prediction["tokens"] = [self.tokenizer.decode(x) for x in tokens]
            prediction["logprobs"] = logprobs_i
        if logprobs or return_stats:
            prediction["stats"] = stats
        return prediction


def _materialise(items, name: str, expected: str) -> list:
    """A list of the caller's items (any iterable but a string or mapping, read once), or ValueError."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        raise ValueError(f"{name} must be {expected}, got {type(items).__name__}")
    return list(items)
