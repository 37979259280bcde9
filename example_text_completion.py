"""Complete a few text prompts with a Llama 2 base model (with no weight flags: the bundled demo model).

    python example_text_completion.py
    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model --device cpu
    python example_text_completion.py --help

A mistake in the flags or the files prints one line saying what is wrong; LLAMA_DEBUG=1 shows the full traceback.
"""

import logging
from typing import List, Optional

from llama import Llama
from llama.cli import run
from llama.distributed import is_printing_rank
from llama.demo import STOP_TOKEN_IDS, stop_ids, weights_or_demo

# The bundled demo model writes stories: it gets story openings.
DEMO_PROMPTS = ["Once upon a time", "Tom and his dog went to the park.", "One day, a little bird"]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    stop_token_ids: Optional[List[int]] = None,
) -> None:
    """Complete a few prompts with a base model and print each prompt with its continuation.

    Args:
        ckpt_dir: The checkpoint folder: Meta's (params.json and consolidated.NN.pth) or a Hugging Face Llama folder.
            Give it with --tokenizer_path, or neither to run the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        temperature: Sampling temperature, >= 0; 0 is greedy (always the likeliest token).
        top_p: Nucleus sampling, in (0, 1]: draw from the likeliest tokens whose probabilities add up to top_p.
        max_seq_len: The most tokens of prompt and reply together; the KV cache is sized for it.
        max_gen_len: The most tokens generated for each prompt.
        max_batch_size: How many prompts run at once (the KV cache holds this many sequences).
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default bfloat16 (or float16) on a GPU, float32 on the CPU.
        stop_token_ids: Token ids that end a continuation like EOS, e.g. 1 or [1,2]; by default none (1 for the demo
            model, which ends a story with BOS).
    """
    is_rank0 = is_printing_rank()  # only rank 0 reports
    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING, format="%(message)s")
    ckpt_dir, tokenizer_path, demo = weights_or_demo(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
    )
    # Token ids that end every reply besides EOS (--stop_token_ids 1: at BOS, where a stories model ends a story).
    generator.engine.stop_token_ids = stop_ids(stop_token_ids, generator) if stop_token_ids is not None else \
        (STOP_TOKEN_IDS if demo else ())
    prompts = DEMO_PROMPTS if demo else [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
        # Few-shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if not is_rank0:
        return
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)
