"""Quantization quality on real weights: perplexity and greedy agreement with float32, one row per precision.

    python -m llama.quality --text tests/data/stories_heldout.txt      (the bundled demo model)
    python -m llama.quality --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --text wiki.test.raw --device cuda

Every precision scores the same text with the perplexity tool's windows and continues the same prompts greedily
(taken from the text at even intervals); agreement compares those tokens with float32's.
"""

import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from llama.checks import check_positive_int
from llama.measure import agreement
from llama.perplexity import default_stride, negative_log_likelihoods, windows

PRECISIONS = ("float32", "bfloat16", "int8", "w8a8", "int4-g32", "int4-g64", "int4-g128")


def prompts_from(tokens: List[int], count: int, length: int) -> List[List[int]]:
    """count prompts of BOS and length tokens, starting at evenly spaced places in tokens (BOS first)."""
    body = tokens[1:]
    step = max(1, (len(body) - length) // max(1, count - 1))
    return [[tokens[0]] + body[i * step : i * step + length] for i in range(count) if body[i * step : i * step + length]]


def _build(ckpt_dir: str, tokenizer_path: str, precision: str, max_seq_len: int, batch: int, device: Optional[str]):
    from llama import Llama

    if precision in ("float32", "bfloat16", "float16"):
        return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, batch, device=device, dtype=precision)
    # Quantized matmuls compute in bfloat16 on CPU (see llama/quantized_linear.py); the rest stays float32 there.
    return Llama.build(ckpt_dir, tokenizer_path, max_seq_len, batch, device=device, quantize=precision)


def measure(ckpt_dir: str, tokenizer_path: str, text: str, precisions: Sequence[str] = PRECISIONS, prompts: int = 32,
            prompt_len: int = 8, gen_len: int = 32, max_seq_len: int = 256, stride: Optional[int] = None,
            max_batch_size: int = 8, device: Optional[str] = None) -> List[dict]:
    """One row per precision: mean NLL, perplexity, and greedy agreement with the first precision (float32), or
    the reason a precision does not apply to this model."""
    stride = default_stride(max_seq_len, stride)
    rows, reference = [], None
    for precision in precisions:
        try:
            generator = _build(ckpt_dir, tokenizer_path, precision, max_seq_len, max_batch_size, device)
        except ValueError as e:  # a scheme whose kernel cannot take this model's shapes
            rows.append({"precision": precision, "refused": str(e)})
            continue
        tokens = generator.tokenizer.encode(text, bos=True, eos=False)
        forward = (lambda ids: generator.model.forward(ids, 0))
        nll = negative_log_likelihoods(forward, tokens, max_seq_len, stride, max_batch_size, generator.device)
        starts = prompts_from(tokens, prompts, prompt_len)
        greedy = generator.generate(starts, max_gen_len=gen_len, temperature=0)[0]
        if reference is None:
            reference = greedy
        rows.append({"precision": precision, "tokens": len(nll), "mean_nll": nll.mean().item(),
                     "perplexity": math.exp(nll.mean().item()), **agreement(greedy, reference, gen_len)})
    return rows


def format_table(rows: List[dict], reference: str = "float32") -> str:
    base = next((r["perplexity"] for r in rows if r["precision"] == reference and "perplexity" in r), None)
    lines = ["| precision | perplexity | vs float32 | greedy tokens equal | rows equal on all tokens | tokens before first difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['precision']} | does not apply: {r['refused']} | | | | |")
            continue
        change = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else ""
        lines.append(f"| {r['precision']} | {r['perplexity']:.4f} | {change} | {100 * r['tokens_equal']:.1f}% | "
                     f"{100 * r['rows_first_n_equal']:.1f}% | {r['mean_tokens_before_first_difference']:.1f} |")
    return "\n".join(lines)


def main(text: str, ckpt_dir: Optional[str] = None, tokenizer_path: Optional[str] = None,
         precisions: str = ",".join(PRECISIONS), prompts: int = 32, gen_len: int = 32, max_seq_len: int = 256,
         stride: Optional[int] = None, device: Optional[str] = None) -> List[dict]:
    """Print the quality table (markdown) of each precision on a text file: perplexity and greedy agreement.

    Args:
        text: The UTF-8 text file to score, whose passages also start the greedy continuations.
        ckpt_dir: The checkpoint folder (Meta's or Hugging Face's layout). Give it with --tokenizer_path, or neither
            for the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        precisions: Comma-separated precisions to compare, float32 first: float32, bfloat16, int8, w8a8, int4-g32,
            int4-g64, int4-g128.
        prompts: How many greedy continuations are compared.
        gen_len: Tokens generated for each continuation.
        max_seq_len: The perplexity window length in tokens.
        stride: How far each window starts after the previous one; by default max_seq_len // 2.
        device: cuda, cpu or mps; by default the best available.
    """
    from llama.demo import weights_or_demo

    if not Path(str(text)).is_file():
        raise FileNotFoundError(f"--text {str(text)!r} is not a file; give the path of a text file")
    check_positive_int("prompts", prompts)
    check_positive_int("gen_len", gen_len)
    windows(2, max_seq_len, default_stride(max_seq_len, stride))  # checks max_seq_len and stride before any model loads
    ckpt_dir, tokenizer_path, _ = weights_or_demo(ckpt_dir, tokenizer_path)
    names = [p for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p]
    torch.manual_seed(0)
    rows = measure(ckpt_dir, tokenizer_path, Path(text).read_text(encoding="utf-8"), names, prompts, 8, gen_len,
                   max_seq_len, stride, device=device)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    from llama.cli import run

    run(main, serialize=lambda _: None)
