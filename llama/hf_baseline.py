"""The transformers baseline of the benchmarks: LlamaForCausalLM holding our model's weights, and its
greedy generate on a batch of prompts (of one length, or left-padded to one).

The weights are shared with our model where the layouts agree; wq and wk rows are put in Hugging
Face's order (llama.hf's name map), which copies those two. EOS is off, as in our benchmark runs:
every row generates exactly the tokens asked for.
"""

import time
from dataclasses import asdict
from typing import Callable, List, Optional

import torch

from llama.hf import meta_rows_to_hf, meta_to_hf_name
from llama.hf_write import config_from_params
from llama.model import Transformer

PAD_ID = 0  # transformers needs a pad id for a padded batch; padded positions are masked out


def hf_model(model: Transformer, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM holding the weights of model (wq and wk rows reordered, the rest shared)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = model.params
    params = {k: v for k, v in asdict(p).items() if k not in ("max_batch_size", "max_seq_len")}
    config = LlamaConfig(**config_from_params(params, p.vocab_size, dtype, max_position_embeddings=max(p.max_seq_len, 4096)))
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        kind = name.split(".")[-2] if name.startswith("layers.") else None
        state[meta_to_hf_name(name)] = meta_rows_to_hf(t, p.head_dim).contiguous() if kind in ("wq", "wk") else t
    hf.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (the rotary inverse frequencies) are not in a state dict: rebuild them.
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            parent_name, _, attr = name.rpartition(".")
            with torch.device(device):
                setattr(hf.get_submodule(parent_name), attr, type(module)(config=config))
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"transformers' model still has tensors on the meta device: {left[:5]}")
    hf.generation_config.eos_token_id = None  # as ours: no EOS, every row generates exactly max_new_tokens
    hf.generation_config.pad_token_id = PAD_ID
    return hf.eval()


def _step_clock():
    """A transformers streamer that notes the wall-clock time of each generated token (its first put()
    is the prompt, each later one a step's new tokens, one per row)."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self):
            self.times: List[float] = []
            self._prompt_seen = False

        def put(self, value) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            self._prompt_seen = True

        def end(self) -> None:
            pass

    return StepClock()


def generate(hf, prompts: List[List[int]], n: int, device: torch.device,
             step_times: Optional[List[float]] = None) -> List[List[int]]:
    """n greedy tokens for each prompt from transformers' generate, the batch left-padded to its longest
    prompt (as transformers requires; the padding masked out). step_times, when given, gets the
    time.perf_counter() at which each step's tokens came out (n of them)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    clock = _step_clock() if step_times is not None else None
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
            # Sampling settings off explicitly: a config that set them would only warn with do_sample=False.
            temperature=None, top_p=None, top_k=None, streamer=clock,
        )
    if clock is not None:
        step_times.extend(clock.times)
    return out[:, width:].tolist()


def generator(hf, device: torch.device) -> Callable[[List[List[int]], int], List[List[int]]]:
    """generate(prompts, n) on hf, for the benchmark's timing loop."""
    return lambda prompts, n: generate(hf, prompts, n, device)
