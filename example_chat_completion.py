"""Reply to a few dialogs with a Llama 2 chat model, or chat with it (--interactive). With no weight flags it runs
the bundled demo model (a tiny story model, not a chat model: its replies are stories).

    python example_chat_completion.py --interactive

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model
    python example_chat_completion.py --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --device cpu

Interactive mode reads one user message per line and streams each reply; /reset, /system TEXT,
/exit and Ctrl-D work as described in llama/interactive.py. It can be scripted through a pipe
(stdout then holds only the "Assistant: ..." lines; notices go to stderr):

    torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir llama-2-13b-chat/ \
        --tokenizer_path tokenizer.model --interactive --system "Always answer with Haiku"
    printf 'Hi!\nWhat can you do?\n' | python example_chat_completion.py ... --interactive

A mistake in the flags or the files prints one line saying what is wrong; LLAMA_DEBUG=1 shows the full traceback.
"""

import logging
import sys
from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import run
from llama.distributed import is_printing_rank
from llama.demo import STOP_TOKEN_IDS, stop_ids, weights_or_demo
from llama.interactive import printer, run_chat, shared_reader, stdin_reader, world_size


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    stop_token_ids: Optional[List[int]] = None,
    interactive: bool = False,
    system: Optional[str] = None,
) -> None:
    """Reply to a fixed set of dialogs and print them, or with --interactive chat on stdin.

    Args:
        ckpt_dir: The checkpoint folder: Meta's (params.json and consolidated.NN.pth) or a Hugging Face Llama folder.
            Give it with --tokenizer_path, or neither to run the bundled demo model.
        tokenizer_path: The tokenizer.model file (or the folder holding it).
        temperature: Sampling temperature, >= 0; 0 is greedy (always the likeliest token).
        top_p: Nucleus sampling, in (0, 1]: draw from the likeliest tokens whose probabilities add up to top_p.
        max_seq_len: The most tokens of dialog and reply together; the KV cache is sized for it. In a chat, the
            oldest exchanges are dropped to fit.
        max_batch_size: How many dialogs run at once (unused with --interactive: one dialog at a time).
        max_gen_len: The most tokens of each reply; by default as many as fit in max_seq_len.
        device: cuda, cpu or mps; by default the best available.
        dtype: float32, float16 or bfloat16; by default bfloat16 (or float16) on a GPU, float32 on the CPU.
        stop_token_ids: Token ids that end a reply like EOS, e.g. 1 or [1,2]; by default none (1 for the demo model,
            which ends a story with BOS).
        interactive: Chat on stdin: one message per line, each reply streamed; /help lists the commands, /exit or
            Ctrl-D ends the chat.
        system: The chat's system prompt (with --interactive only).
    """
    if system is not None and not interactive:
        raise ValueError("--system applies only with --interactive; add --interactive or drop --system")
    if system is not None and not isinstance(system, str):
        system = str(system)  # fire turns values like 42 or [1, 2] into Python objects
    is_rank0 = is_printing_rank()  # only rank 0 reports
    logging.basicConfig(level=logging.INFO if is_rank0 else logging.WARNING, format="%(message)s")
    ckpt_dir, tokenizer_path, demo = weights_or_demo(ckpt_dir, tokenizer_path)
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1 if interactive else max_batch_size,
        device=device,
        dtype=dtype,
    )
    # Token ids that end every reply besides EOS (--stop_token_ids 1: at BOS, where a stories model ends a story).
    generator.engine.stop_token_ids = stop_ids(stop_token_ids, generator) if stop_token_ids is not None else \
        (STOP_TOKEN_IDS if demo else ())
    if interactive:
        chat(generator, is_rank0, system=system, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        return
    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": "Paris, the capital of France, is known for its stunning architecture, art museums, "
                "historical landmarks, and romantic atmosphere. The Eiffel Tower, the Louvre Museum and "
                "Notre-Dame Cathedral are among the most famous sights.",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {"role": "system", "content": "Always answer with emojis"},
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
        [
            {
                "role": "system",
                "content": "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
                "possible, while being safe. If you don't know the answer to a question, please don't share "
                "false information.",
            },
            {"role": "user", "content": "Write a brief birthday message to John"},
        ],
        [{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}],
    ]
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if not is_rank0:
        return
    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
        print("\n==================================\n")


def chat(generator: Llama, is_rank0: bool, **settings) -> None:
    """The interactive session: rank 0 reads stdin and prints; every rank generates in lockstep."""
    def silent(text: str) -> None:
        pass

    run_chat(
        generator,
        shared_reader(stdin_reader() if is_rank0 else lambda: None),
        printer(sys.stdout) if is_rank0 else silent,
        notify=printer(sys.stderr, end="\n") if is_rank0 else silent,
        # Under torchrun Ctrl-C goes to the launcher, which ends the job.
        catch_interrupt=world_size() == 1,
        **settings,
    )


if __name__ == "__main__":
    run(main)
