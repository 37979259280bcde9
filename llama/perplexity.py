"""Perplexity of a model on a text file, in sliding windows.

    python -m llama.perplexity --ckpt_dir DIR --tokenizer_path FILE --text story.txt [--max_seq_len 512 --stride 256]

The text is encoded with BOS first and every token after BOS is scored once, from the window that gives it the
most context: windows of max_seq_len tokens start every stride tokens, and each scores the tokens the previous
window did not reach.
"""

import json as _json
import math
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama.checks import is_int

Window = Tuple[int, int, int]  # (begin, end, first): tokens[begin:end] go in, tokens first..end-1 are scored


def default_stride(max_seq_len: int, stride: Optional[int] = None) -> int:
    """stride, or when None half a window (at least 1)."""
    return max(1, max_seq_len // 2) if stride is None else stride


def windows(n_tokens: int, max_seq_len: int, stride: int) -> List[Window]:
    """The windows over n_tokens tokens (token 0 is BOS and is not scored)."""
    if not is_int(max_seq_len) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer of at least 2 (a window scores the tokens after its first), "
                         f"got {max_seq_len!r}")
    if not is_int(stride) or not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride={stride} must be between 1 and max_seq_len={max_seq_len}")
    if n_tokens < 2:
        raise ValueError("the text is empty: there is no token after BOS to score")
    out, scored_to, begin = [], 1, 0
    while scored_to < n_tokens:
        end = min(begin + max_seq_len, n_tokens)
        out.append((begin, end, scored_to))
        scored_to = end
        # The next window starts stride later, but no later than the last token it must see to score the next one.
        begin = min(begin + stride, scored_to - 1)
    return out


@torch.no_grad()
def negative_log_likelihoods(forward: Callable[[torch.Tensor], torch.Tensor], tokens: List[int], max_seq_len: int,
                             stride: int, batch_size: int, device, progress: bool = False) -> torch.Tensor:
    """The NLL (nats, float64) of every token after the first, in order. forward(tokens (bsz, len)) -> logits."""
    spans = windows(len(tokens), max_seq_len, stride)
    nll = torch.empty(len(tokens) - 1, dtype=torch.float64)
    # Windows of one length run together (all but the last are max_seq_len long).
    groups = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    for batch in tqdm(batches, desc="Scoring", unit="batch", disable=not progress):
        ids = torch.tensor([tokens[begin:end] for begin, end, _ in batch], device=device)
        logits = forward(ids).float()
        for row, (begin, end, first) in enumerate(batch):
            # Position j's logits predict token j + 1: tokens first..end-1 come from positions first-1..end-2.
            predicted = logits[row, first - 1 - begin : end - 1 - begin]
            targets = ids[row, first - begin : end - begin]
            nll[first - 1 : end - 1] = F.cross_entropy(predicted, targets, reduction="none").double().cpu()
    return nll


def main(
    text: str,
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 512,
    stride: Optional[int] = None,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    json: Optional[str] = None,
) -> dict:
    """Print tokens scored, mean NLL (nats per token) and perplexity of a text file.

    Args:
        text: The UTF-8 text file to score.
        ckpt_dir: The checkpoint folder (Meta's or Hugging Face's layout). Give it with --tokenizer_path, or neither
            to score the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        max_seq_len: The window length in tokens.
        stride: How far each window starts after the previous one, from 1 to max_seq_len; by default max_seq_len // 2.
        max_batch_size: How many windows run at once.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default the device's (float32 on the CPU).
        quantize: int8, w8a8 or int4[-gN] to score the model with quantized weights; by default none.
        compile: Compile the scoring forward pass with torch.compile.
        json: A file to write the results to as JSON as well.
    """
    from llama import Llama
    from llama.demo import weights_or_demo
    from llama.distributed import global_rank

    from llama.measure import check_output_path

    path = Path(str(text))
    if not path.is_file():
        raise FileNotFoundError(f"--text {str(text)!r} is not a file; give the path of a text file")
    json = check_output_path(json)
    ckpt_dir, tokenizer_path, _ = weights_or_demo(ckpt_dir, tokenizer_path)
    stride = default_stride(max_seq_len, stride)
    windows(2, max_seq_len, stride)  # checks stride before the model loads
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype,
                            quantize=quantize)
    model = generator.model
    tokens = generator.tokenizer.encode(path.read_text(encoding="utf-8"), bos=True, eos=False)
    forward = (lambda ids: model.forward(ids, 0))
    if compile:
        forward = torch.compile(forward)
    nll = negative_log_likelihoods(forward, tokens, max_seq_len, stride, max_batch_size, generator.device,
                                   progress=global_rank() == 0)
    result = {"tokens": len(nll), "mean_nll": nll.mean().item(), "perplexity": math.exp(nll.mean().item())}
    if global_rank() == 0:
        print(f"tokens scored: {result['tokens']}\nmean NLL: {result['mean_nll']:.4f} nats/token\n"
              f"perplexity: {result['perplexity']:.4f}")
        if json is not None:
            Path(json).write_text(_json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from llama.cli import run

    run(main, serialize=lambda _: None)
