"""Scheduling for the engine: what an admitted request holds, and each step's decisions.

The decisions are a pure function of the queue and the slots (plan_step), taken on rank 0 and applied by
every rank, so ranks under model parallelism never diverge.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from llama.request import RequestSpec
from llama.streaming import IncrementalDecoder


@dataclass(eq=False)  # compared and hashed by identity
class Running:
    """An admitted request: its slot, the prompt tokens in the cache, what it has generated."""

    id: int
    spec: RequestSpec
    limit: int  # tokens it may generate: max_gen_len, or fewer where the context ends first
    decoder: IncrementalDecoder
    generator: Optional[torch.Generator]
    slot: int = -1
    fed: int = 0  # prompt tokens already in the cache
    generated: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)
    prompt_logprobs: List[float] = field(default_factory=list)
    text_end: Optional[int] = None  # with a stop string: where the text is cut

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.spec.prompt)


def decode_batch(decoding: List[Running], max_seq_len: int) -> Tuple[List[int], List[int], int]:
    """The decode step's rows for the decoding requests: (tokens, positions, kv_len), one row per slot from 0 to the
    highest one in use, so the cache is read in place. A slot without a decoding request gets a stand-in row at the
    last cache position: written there before any real token is (a sequence writes a position before it reads it),
    never read. The caller keeps the decoding requests' rows."""
    n = max(r.slot for r in decoding) + 1
    tokens, positions = [0] * n, [max_seq_len - 1] * n
    for r in decoding:
        tokens[r.slot] = r.generated[-1]
        positions[r.slot] = len(r.spec.prompt) + len(r.generated) - 1
    return tokens, positions, max(positions[r.slot] for r in decoding) + 1


def feeding_groups(chunks: List[Tuple[Running, int]], cache_len: int, waste: float) -> List[List[Tuple[Running, int]]]:
    """Prompt chunks (request, tokens) in groups, each fed as one batch padded to its longest chunk (one part of
    the step's forward call, with one attention call per layer): a group holds at most `waste` times the tokens
    of its chunks (1.0: only chunks of equal length go together). A request that scores its prompt goes alone
    (it needs every position's logits), as does one whose padding would run past the cache's end."""
    groups: List[List[Tuple[Running, int]]] = []
    for request, n in sorted(chunks, key=lambda c: -c[1]):
        group = groups[-1] if groups else None
        if (group and not group[0][0].spec.prompt_logprobs and not request.spec.prompt_logprobs
                and request.fed + group[0][1] <= cache_len
                and (len(group) + 1) * group[0][1] <= waste * (sum(m for _, m in group) + n)):
            group.append((request, n))
        else:
            groups.append([(request, n)])
    return groups


@dataclass
class Plan:
    """One step's decisions: aborted ids, admissions (id, slot, spec), moves (id, new slot), prompt chunks
    (id, tokens), and whether rank 0 has closed the engine (the other ranks' follow() then returns)."""

    aborts: List[int]
    admits: List[Tuple[int, int, RequestSpec]]
    moves: List[Tuple[int, int]]
    chunks: List[Tuple[int, int]]
    closed: bool = False


def plan_step(aborts: List[int], waiting: List[Tuple[int, RequestSpec]], requests: Dict[int, Running],
              slots: List[Optional[int]], continuous: bool, prefill_chunk: int, max_prefill_tokens: int,
              closed: bool) -> Plan:
    """One step's decisions, from the queue (waiting, in arrival order), the admitted requests by id and the
    request id in each slot: admit waiting requests into free slots (continuous: whenever one is free; else
    only when every slot is), move requests down into free slots when nothing waits, and pick the prompt
    tokens to read, the requests already reading their prompts first. While any request generates, the
    step reads at most prefill_chunk of them (their next tokens wait on the step); while none does, up to
    max_prefill_tokens (nobody waits), so a burst of requests has its prompts read before any token streams
    and no stream stalls for the others'. A request that scores its prompt reads at most prefill_chunk
    tokens a step, since it keeps the logits of every position."""
    free = [s for s, owner in enumerate(slots) if owner is None or owner in aborts]
    waiting = [(i, spec) for i, spec in waiting if i not in aborts]
    admits = []
    running = [i for i in requests if i not in aborts]
    if continuous or not running:
        for (request_id, spec), slot in zip(waiting, free):
            admits.append((request_id, slot, spec))
    moves = []
    if len(waiting) == len(admits):
        # Nothing waits for the free slots: fill those below the highest one in use from the top, since a
        # decode step computes a row for every slot up to the highest.
        free = free[len(admits):]
        used = sorted((requests[i].slot, i) for i in running)
        while free and used and free[0] < used[-1][0]:
            moves.append((used.pop()[1], free.pop(0)))
    generating = any(requests[i].decoding for i in running)
    budget = prefill_chunk if generating else max(prefill_chunk, max_prefill_tokens)
    chunks = []
    prefilling = [requests[i] for i in running if not requests[i].decoding]
    for request_id, need, spec in [(r.id, len(r.spec.prompt) - r.fed, r.spec) for r in prefilling] + \
            [(i, len(spec.prompt), spec) for i, _, spec in admits]:
        if budget == 0:
            break
        chunks.append((request_id, min(need, budget, prefill_chunk if spec.prompt_logprobs else need)))
        budget -= chunks[-1][1]
    return Plan(aborts, admits, moves, chunks, closed)

