"""lm-evaluation-harness on the library: an lm_eval model class backed by Llama, and a command that runs tasks.

    python -m llama.evaluate --tasks hellaswag,arc_easy --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 -m llama.evaluate --tasks mmlu --ckpt_dir llama-2-13b/ ...   (rank 0 reports)

Scoring requests run as batches of full forward passes; generation requests run through the engine.
"""

import difflib
import json as _json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from llama.generation import Llama
from llama.perplexity import default_stride, negative_log_likelihoods
from llama.sampling import SamplingParams


class LlamaLM(LM):
    """lm_eval's model interface (loglikelihood, loglikelihood_rolling, generate_until) on a Llama.

    Under model parallelism every rank runs every request (the ranks split the model, not the data),
    so rank and world_size are those of one process for lm_eval.
    """

    def __init__(self, generator: Llama, batch_size: Optional[int] = None):
        super().__init__()
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_seq_len = generator.engine.max_seq_len
        self.batch_size = batch_size or generator.model.cache_shape[0]

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.generator.model.forward(tokens.to(self.generator.device), 0)

    def _pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """Token ids of [BOS] + context and of the continuation, split where encoding the whole text splits."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # a trailing space belongs to the continuation's first piece in SentencePiece
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, bos=True, eos=False)
        head = len(self.tokenizer.encode(context, bos=True, eos=False))
        return whole[:head], whole[head:]

    @torch.no_grad()
    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        """For each (context, continuation): the log-probability of the continuation after the context, and whether
        greedy decoding would produce it. Sequences longer than max_seq_len lose their oldest context tokens."""
        pairs = [self._pair(*r.args) for r in requests]
        for i, (_, continuation) in enumerate(pairs):
            if len(continuation) >= self.max_seq_len:
                raise ValueError(f"request {i}: its continuation has {len(continuation)} tokens, more than fit in "
                                 f"max_seq_len={self.max_seq_len} with any context; build with a larger max_seq_len")
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            sequences = [(pairs[i][0] + pairs[i][1])[-self.max_seq_len :] for i in batch]
            width = max(len(s) for s in sequences)
            ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])  # right padding: causal, never attended
            logits = self._forward(ids).float()
            for row, i in enumerate(batch):
                n, length = len(pairs[i][1]), len(sequences[row])
                predicted = logits[row, length - n - 1 : length - 1]
                targets = ids[row, length - n : length].to(predicted.device)
                logprob = -F.cross_entropy(predicted, targets, reduction="sum").item()
                results[i] = (logprob, bool((predicted.argmax(-1) == targets).all()))
        return results

    def loglikelihood_rolling(self, requests) -> List[float]:
        """For each (text,): the log-probability of all its tokens after BOS, in windows of max_seq_len."""
        out = []
        for request in requests:
            tokens = self.tokenizer.encode(request.args[0], bos=True, eos=False)
            if len(tokens) < 2:
                out.append(0.0)
                continue
            nll = negative_log_likelihoods(self._forward, tokens, self.max_seq_len, default_stride(self.max_seq_len),
                                           self.batch_size, self.generator.device)
            out.append(-nll.sum().item())
        return out

    def generate_until(self, requests) -> List[str]:
        """For each (context, gen_kwargs): the continuation until one of gen_kwargs["until"] (cut before it) or
        max_gen_toks tokens; greedy unless do_sample with a temperature. All run together on the engine."""
        specs = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [u for u in until if u]
            max_gen = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            sampling = SamplingParams(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0)), stop=until,
                                      seed=kwargs.pop("seed", None))
            prompt = self.tokenizer.encode(context, bos=True, eos=False)
            max_gen = max(1, min(max_gen, self.max_seq_len - 1))
            rest = prompt[1:]  # keep BOS; drop the oldest context tokens that leave no room for max_gen
            prompt = [prompt[0]] + rest[max(0, len(rest) - (self.max_seq_len - max_gen - 1)) :]
            specs.append(self.generator.engine.make_spec(prompt, sampling, max_gen, name=f"request {i}"))
        return [done.text for done in self.generator.run_requests(specs)]


def check_task_names(names: List[str], known: Sequence[str]) -> None:
    """ValueError naming each of names that is neither one of lm-eval's known tasks (groups, tags) nor a YAML file,
    with the closest known names."""
    known_set = set(known)
    unknown = [n for n in names if n not in known_set and not Path(n).is_file()]
    if unknown:
        hints = [f"{n!r} (closest: {', '.join(difflib.get_close_matches(n, known, n=3)) or 'none'})" for n in unknown]
        raise ValueError(f"unknown lm-eval task {'; '.join(hints)}; `lm-eval ls tasks` lists them all, and "
                         f"--include_path adds a folder of your own task YAMLs")


def main(
    tasks: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 2048,
    max_batch_size: int = 8,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    include_path: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    output: Optional[str] = None,
    seed: int = 1234,
) -> Optional[dict]:
    """Run lm-evaluation-harness tasks on a checkpoint and print lm-eval's table.

    Args:
        tasks: Comma-separated lm-eval task names, e.g. hellaswag,arc_easy.
        ckpt_dir: The checkpoint folder (Meta's or Hugging Face's layout). Give it with --tokenizer_path, or neither
            for the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        max_seq_len: The most tokens of context and continuation; older context tokens are dropped beyond it.
        max_batch_size: How many requests run at once.
        num_fewshot: Examples put before each question; by default each task's own number.
        limit: Requests per task: a count, or a fraction below 1 of each task; by default all.
        include_path: A folder of your own task YAML files.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default the device's (float32 on the CPU).
        quantize: int8, w8a8 or int4[-gN] to evaluate the model with quantized weights; by default none.
        compile: Generate through the torch.compile'd decode step.
        output: A file to write the results to as JSON as well.
        seed: Seeds torch's, Python's and numpy's generators and lm-eval's few-shot sampling.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from llama.demo import weights_or_demo
    from llama.distributed import global_rank

    from llama.measure import check_output_path

    names = [t for t in (tasks.split(",") if isinstance(tasks, str) else list(tasks)) if t]
    if not names:
        raise ValueError("--tasks needs at least one task name, e.g. --tasks hellaswag,arc_easy")
    output = check_output_path(output, "--output")
    task_manager = TaskManager(include_path=include_path)
    check_task_names(names, task_manager.all_tasks)  # before the weights load
    ckpt_dir, tokenizer_path, _ = weights_or_demo(ckpt_dir, tokenizer_path)
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype,
                            compile=compile, quantize=quantize, seed=seed)
    results = lm_eval.simple_evaluate(
        model=LlamaLM(generator), tasks=names, num_fewshot=num_fewshot, limit=limit,
        task_manager=task_manager, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
    )
    if global_rank() != 0 or results is None:
        return None
    print(make_table(results))
    if output is not None:
        Path(output).write_text(_json.dumps({"results": results["results"], "config": results.get("config")},
                                            indent=2, default=str) + "\n")
    return results["results"]


if __name__ == "__main__":
    from llama.cli import run

    run(main, serialize=lambda _: None)
