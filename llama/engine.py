"""Continuous batching: a per-step scheduler over the model's KV-cache slots.

Requests wait in a queue, take a free cache slot as soon as one exists, have their prompts fed in
chunks (a long prompt never stalls the running requests for more than one chunk per step, and a step's
chunks ride in the same forward call as its decode rows, one read of the weights for both; with no
request generating, a burst's prompts are read at once), then
decode one token per step beside every other running request, each with its own sampling settings,
and leave the step they end, freeing their slot at once. Under model parallelism rank 0 makes every
scheduling decision and the other ranks apply the same plan, so all ranks run the same forward calls.
"""

import itertools
from collections import deque
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama.checks import as_float, check_positive_int
from llama.request import Completion, RequestSpec, StepOutput, make_spec
from llama.model import Part
from llama.sampling import SamplingParams, TokenHistory, next_tokens
from llama.scheduling import Plan, Running, decode_batch, feeding_groups, plan_step
from llama.streaming import IncrementalDecoder
from llama.tokenizer import Tokenizer

POLICIES = ("continuous", "static")


def check_prefill_options(prefill_chunk: Optional[int], max_prefill_tokens: int) -> None:
    """ValueError naming a bad prefill_chunk (None: the device's default) or max_prefill_tokens, for commands
    that check their options before reading any weights."""
    if prefill_chunk is not None:
        check_positive_int("prefill_chunk", prefill_chunk)
    check_positive_int("max_prefill_tokens", max_prefill_tokens)


class Engine:
    """Schedules requests over the model's KV-cache slots, one step at a time.

    add_request() queues a request and returns its id; step() advances every running request by one
    token and returns a StepOutput for each request it touched; abort(id) ends a request at the next
    step; has_work() says whether anything is waiting or running. Not thread-safe: one caller steps.

    policy "continuous" admits a waiting request whenever a slot is free; "static" only when every
    slot is free (a batch runs until its last request ends), for comparison. prefill_chunk bounds the
    prompt tokens read in a step while any request generates (by default 128 on CPU, 512 elsewhere);
    max_prefill_tokens bounds them while none does. decode: the one-token step, called as
    decode(tokens (n, 1), positions (n, 1), kv_len) -> logits (n, vocab) (default: model.forward).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        prefill_chunk: Optional[int] = None,
        max_prefill_tokens: int = 8192,
        policy: str = "continuous",
        decode: Optional[Callable] = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if model.cache_shape is None:
            model.setup_cache()
        self.model, self.tokenizer = model, tokenizer
        cpu = self.device.type == "cpu"
        # Checked by their setters.
        self.prefill_chunk = prefill_chunk if prefill_chunk is not None else (128 if cpu else 512)
        self.max_prefill_tokens, self.policy = max_prefill_tokens, policy
        self.prompt_padding = 1.0 if cpu else 1.25
        self._decode = decode or self._eager_decode
        self._ids = itertools.count()
        self._waiting: deque = deque()  # (id, spec), in arrival order
        self._requests: Dict[int, Running] = {}  # admitted ones, by id
        self._slots: List[Optional[int]] = [None] * model.cache_shape[0]  # request id in each slot
        self._aborts: List[int] = []
        self.closed = False
        #: Token ids that end every request, like EOS (e.g. (1,) for a model that ends its text with BOS).
        self.stop_token_ids: Tuple[int, ...] = ()
        self._history = TokenHistory(len(self._slots), model.vocab_size, self.device)

    @property
    def prefill_chunk(self) -> int:
        """The most prompt tokens read in one step, across requests, while any request generates: how long a
        prompt that joins may hold up their next tokens. May be changed between steps. By default 128 on CPU,
        where a step reading 128 prompt tokens already keeps the cores busy (larger chunks read barely more
        tokens per second but stall the running requests longer), and 512 elsewhere."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, value: int) -> None:
        # 0 would feed no prompt token ever: admitted requests would wait forever.
        self._prefill_chunk = check_positive_int("prefill_chunk", value)

    @property
    def max_prefill_tokens(self) -> int:
        """The most prompt tokens read in one step while no request generates (at least prefill_chunk): no token
        waits on such a step, so the prompts of a burst are read at once, not in chunks that would then stall
        the first requests' streams. It bounds the step's activation memory and how long it runs."""
        return self._max_prefill_tokens

    @max_prefill_tokens.setter
    def max_prefill_tokens(self, value: int) -> None:
        self._max_prefill_tokens = check_positive_int("max_prefill_tokens", value)

    @property
    def prompt_padding(self) -> float:
        """The most tokens a group of prompt chunks fed as one padded batch may hold, as a multiple of its chunks' own
        (1.0: only chunks of one length go together). On CPU a step is compute-bound and padded tokens cost as much
        as real ones, so chunks of different lengths go as separate parts of the forward call (which still share
        every matmul); on GPUs a part's attention kernels cost more than a few padded rows."""
        return self._prompt_padding

    @prompt_padding.setter
    def prompt_padding(self, value: float) -> None:
        padding = as_float(value)
        if padding is None or not 1.0 <= padding < float("inf"):
            raise ValueError(f"prompt_padding must be a finite number of at least 1.0, got {value!r}")
        self._prompt_padding = padding

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def max_seq_len(self) -> int:
        return min(self.model.params.max_seq_len, self.model.cache_shape[1])

    def add_request(
        self,
        prompt_tokens: Sequence[int],
        sampling: Optional[SamplingParams] = None,
        max_gen_len: Optional[int] = None,
        *,
        stop_token_ids: Optional[Sequence[int]] = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        prompt_logprobs: bool = False,
        ignore_eos: bool = False,
    ) -> int:
        """Queue a request; returns its id. Checks everything first (ValueError), so a refused request
        changes nothing. max_gen_len None: until the context (max_seq_len) is full. logprobs: the
        log-probability of each generated token; top_logprobs: that many likeliest alternatives at each;
        prompt_logprobs: the log-probability of each prompt token (the whole prompt is scored);
        ignore_eos: EOS is a token like any other (benchmarks that want a fixed length)."""
        spec = self.make_spec(prompt_tokens, sampling, max_gen_len, stop_token_ids=stop_token_ids, logprobs=logprobs,
                              top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs, ignore_eos=ignore_eos)
        return self.add_spec(spec)

    def make_spec(self, prompt_tokens, sampling=None, max_gen_len=None, *, name: str = "prompt", **options) -> RequestSpec:
        """A checked RequestSpec (ValueError naming what is wrong), without queueing it; options as add_request's."""
        return make_spec(prompt_tokens, sampling, max_gen_len, self.model.vocab_size, self.max_seq_len, name=name,
                         **options)

    def add_spec(self, spec: RequestSpec) -> int:
        """Queue a request made by make_spec; returns its id."""
        request_id = next(self._ids)
        self._waiting.append((request_id, spec))
        return request_id

    def abort(self, request_id: int) -> None:
        """End a waiting or running request at the next step (its output says "abort"); an unknown or
        finished id does nothing."""
        if request_id in self._requests or any(i == request_id for i, _ in self._waiting):
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._requests or self._aborts)

    def follow(self) -> None:
        """On the ranks other than 0 of a model-parallel server: step as rank 0 does (each step waits for
        rank 0's plan, which carries the requests it admits) until rank 0 calls close(). Rank 0 steps
        at least every few seconds while idle, so no collective times out."""
        while not self.closed:
            self.step()

    def close(self) -> None:
        """On rank 0: end the other ranks' follow() (one more step carries the news)."""
        self.closed = True
        self.step()

    @property
    def num_running(self) -> int:
        return len(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @torch.no_grad()
    def step(self) -> List[StepOutput]:
        """Run one step: aborts, admissions, prompt tokens (at most prefill_chunk while any request
        generates, else max_prefill_tokens), one new token for every running request. An exception in the
        model or the sampler fails the requests of this step (their outputs carry it) and leaves the engine
        usable."""
        plan = self._share(self._plan())
        outputs = [self._finish(self._requests[i], "abort") if i in self._requests else self._drop_waiting(i)
                   for i in plan.aborts]
        outputs = [o for o in outputs if o is not None]
        for request_id, slot, spec in plan.admits:
            self._admit(request_id, slot, spec)
        for request_id, slot in plan.moves:
            self._move(self._requests[request_id], slot)
        decoding = [r for r in self._requests.values() if r.decoding and r.generated]
        chunked = [self._requests[i] for i, _ in plan.chunks]
        try:
            rows, logits = self._forward(plan.chunks, decoding)
            tokens = self._sample(rows, logits)
        except Exception as error:  # noqa: BLE001 (the step's requests fail with it; the engine goes on)
            for request in dict.fromkeys(decoding + chunked):
                outputs.append(self._finish(request, "error", error))
            return outputs
        for request, token, row_logits in zip(rows, tokens, logits):
            outputs.append(self._accept(request, token, row_logits))
        for request in chunked:
            if request not in rows:  # still reading its prompt, or it filled the context
                if request.decoding and request.limit == 0:
                    outputs.append(self._finish(request, "length"))
                else:
                    outputs.append(StepOutput(request.id, [], ""))
        return outputs

    # Scheduling (rank 0) ---------------------------------------------------------------------------

    def _plan(self) -> Plan:
        aborts, self._aborts = list(dict.fromkeys(self._aborts)), []
        return plan_step(aborts, list(self._waiting), self._requests, self._slots, self.policy == "continuous",
                         self.prefill_chunk, self.max_prefill_tokens, self.closed)

    def _share(self, plan: Plan) -> Plan:
        """Under model parallelism every rank takes rank 0's plan."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return plan
        box = [plan if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        plan = box[0]
        self.closed = plan.closed
        # Requests rank 0 admitted are queued here too (the same program ran on every rank) or come from the plan.
        admitted = {i for i, _, _ in plan.admits} | set(plan.aborts)
        self._waiting = deque((i, s) for i, s in self._waiting if i not in admitted)
        self._aborts = []
        return plan

    def _drop_waiting(self, request_id: int) -> Optional[StepOutput]:
        for i, spec in list(self._waiting):
            if i == request_id:
                self._waiting.remove((i, spec))
                completion = Completion([], "", [], [], [], len(spec.prompt), "abort")
                return StepOutput(request_id, [], "", finish_reason="abort", completion=completion)
        return None

    def _admit(self, request_id: int, slot: int, spec: RequestSpec) -> None:
        self._waiting = deque((i, s) for i, s in self._waiting if i != request_id)
        generator = None
        if spec.sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(spec.sampling.seed)
        limit = min(spec.max_gen_len, self.max_seq_len - len(spec.prompt))
        decoder = IncrementalDecoder(self.tokenizer.decode, spec.sampling.stop)
        request = Running(request_id, spec, limit, decoder, generator, slot)
        self._requests[request_id] = request
        self._slots[slot] = request_id
        self._history.start(slot, spec.prompt, spec.sampling)

    def _move(self, request: Running, slot: int) -> None:
        """Move a request to another (free) slot, with its cached keys and values and penalty state."""
        self.model.move_slot(request.slot, slot, request.fed + max(0, len(request.generated) - 1))
        self._history.move(request.slot, slot)
        self._slots[request.slot], self._slots[slot] = None, request.id
        request.slot = slot

    # The model ---------------------------------------------------------------------------------------

    def _forward(self, chunks: List[Tuple[int, int]], decoding: List[Running]) -> Tuple[List[Running], torch.Tensor]:
        """Feed this step's prompt chunks (those of similar lengths together) and one token of each decoding
        request, in one forward call when there are chunks (the decode rows share the prompts' read of the
        weights), else in the decode step. Returns the requests that get a new token and their last-position
        logits (rows, vocab)."""
        in_slots = torch.tensor([r.slot for r in decoding], device=self.device)
        if not chunks:
            return decoding, (self._decode(*self._decode_rows(decoding))[in_slots] if decoding else torch.empty(0))
        fed = [(self._requests[i], n) for i, n in chunks]
        groups = feeding_groups(fed, self.model.cache_shape[1], self.prompt_padding)
        parts = [self._prompt_part(group) for group in groups]
        if decoding:
            tokens, positions, kv_len = self._decode_rows(decoding)
            parts.append(Part(tokens, positions, kv_len=kv_len))
        outs = self.model.forward_parts(parts)
        last = {}
        for group, out in zip(groups, outs):
            for (request, n), row in zip(group, out):
                if request.spec.prompt_logprobs:
                    self._score_prompt(request, request.fed, row)
                request.fed += n
                last[request.id] = row[-1]
        rows = [r for r, _ in fed if r.decoding and r.limit > 0]
        logits = [last[r.id] for r in rows]
        if decoding:
            logits += list(outs[-1][in_slots, -1])
            rows += decoding
        return rows, torch.stack(logits) if logits else torch.empty(0)

    def _prompt_part(self, group: List[Tuple[Running, int]]) -> Part:
        """The prompt chunks of group (request, tokens) as one part of a forward call, padded to the longest;
        each request's logits at its chunk's last token (every position's for one that scores its prompt, which
        goes alone). The padding's keys and values land at positions its request writes before reading them."""
        if len(group) == 1:
            request, n = group[0]
            tokens = torch.tensor([request.spec.prompt[request.fed : request.fed + n]], device=self.device)
            slot = torch.tensor([request.slot], device=self.device)
            return Part(tokens, request.fed, slot, last_only=not request.spec.prompt_logprobs)
        width = max(n for _, n in group)
        tokens = [r.spec.prompt[r.fed : r.fed + n] + [0] * (width - n) for r, n in group]
        positions = [range(r.fed, r.fed + width) for r, _ in group]
        kv_len = max(r.fed + n for r, n in group)
        return Part(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                    torch.tensor([r.slot for r, _ in group], device=self.device), kv_len,
                    output_index=torch.tensor([n - 1 for _, n in group], device=self.device))

    def _decode_rows(self, decoding: List[Running]) -> Tuple[torch.Tensor, torch.Tensor, int]:
        tokens, positions, kv_len = decode_batch(decoding, self.max_seq_len)
        return (torch.tensor(tokens, device=self.device)[:, None], torch.tensor(positions, device=self.device)[:, None],
                kv_len)

    def _eager_decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.model.forward(tokens, positions, kv_len=kv_len)[:, -1]

    def _score_prompt(self, request: Running, start: int, logits: torch.Tensor) -> None:
        """Position j's logits predict prompt token j + 1."""
        prompt = request.spec.prompt
        if start == 0:
            request.prompt_logprobs.append(0.0)  # nothing predicts the first token
        targets = prompt[start + 1 : start + logits.shape[0] + 1]
        if targets:
            lps = -F.cross_entropy(logits[: len(targets)], torch.tensor(targets, device=logits.device), reduction="none")
            request.prompt_logprobs += lps.tolist()

    def _sample(self, rows: List[Running], logits: torch.Tensor) -> List[int]:
        if not rows:
            return []
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        tokens = next_tokens(logits, [r.spec.sampling for r in rows], [r.generator for r in rows],
                             *self._history.rows(slots))
        self._history.add(slots, tokens)
        return tokens.tolist()

    # Results -----------------------------------------------------------------------------------------

    def _accept(self, request: Running, token: int, logits: torch.Tensor) -> StepOutput:
        """Add a newly sampled token to request; retire it if it ends here."""
        if token == self.tokenizer.eos_id and not request.spec.ignore_eos:
            return self._finish(request, "eos")
        if token in request.spec.stop_token_ids or token in self.stop_token_ids:
            return self._finish(request, "stop")
        request.generated.append(token)
        spec = request.spec
        if spec.logprobs or spec.top_logprobs:
            lps = torch.log_softmax(logits.float(), dim=-1)
            request.logprobs.append(lps[token].item())
            if spec.top_logprobs:
                top = torch.topk(lps, spec.top_logprobs)
                request.top_logprobs.append(dict(zip(top.indices.tolist(), top.values.tolist())))
        text = request.decoder.text(request.generated)
        if spec.sampling.stop:
            found = [i for i in (text.find(s) for s in spec.sampling.stop) if i >= 0]
            if found:
                request.text_end = min(found)
                n = len(request.generated)
                # Keep only the tokens needed to spell the text before the stop string.
                while len(request.generated) > 1 and len(self.tokenizer.decode(request.generated[:-1])) >= request.text_end:
                    request.generated.pop()
                return self._finish(request, "stop", new_tokens=[token] if len(request.generated) == n else [])
        if len(request.generated) == request.limit:
            return self._finish(request, "length", new_tokens=[token])
        return StepOutput(request.id, [token], request.decoder.stable(text), request.logprobs[-1:],
                          request.top_logprobs[-1:])

    def _finish(self, request: Running, reason: str, error: Optional[BaseException] = None,
                new_tokens: Sequence[int] = ()) -> StepOutput:
        del self._requests[request.id]
        self._slots[request.slot] = None
        n = len(request.generated)
        text = request.decoder.text(request.generated)
        if request.text_end is not None:
            text = text[: request.text_end]
        completion = Completion(request.generated, text, request.logprobs[:n], request.top_logprobs[:n],
                                request.prompt_logprobs, len(request.spec.prompt), reason)
        delta = request.decoder.emit_until(text, len(text))
        k = len(new_tokens) if request.logprobs else 0
        return StepOutput(request.id, list(new_tokens), delta, request.logprobs[len(request.logprobs) - k:],
                          request.top_logprobs[len(request.top_logprobs) - k:] if request.top_logprobs else [],
                          reason, completion, error)
