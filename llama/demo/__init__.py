"""The bundled demo model (stories260K, a tiny story model): what the examples and the server run when they are
given no weights, so that a newcomer's first command shows real text."""

import sys
from pathlib import Path
from typing import Optional, Tuple

#: The demo model ends a story with BOS (id 1), not EOS.
STOP_TOKEN_IDS = (1,)


def demo_model_dir() -> Path:
    """The bundled stories260K checkpoint (Meta's layout; its tokenizer is tokenizer.model inside)."""
    return Path(__file__).resolve().parent / "stories260K"


def weights_or_demo(ckpt_dir: Optional[str], tokenizer_path: Optional[str]) -> Tuple[str, str, bool]:
    """(ckpt_dir, tokenizer_path, is_demo): the given pair, or the demo model when both are omitted (saying so on
    stderr). Giving only one of the two is an error."""
    if ckpt_dir is None and tokenizer_path is None:
        print("Running the bundled demo model (stories260K, a 260K-parameter story model, not a chat model); "
              "pass --ckpt_dir and --tokenizer_path to run real Llama 2 weights.", file=sys.stderr)
        return str(demo_model_dir()), str(demo_model_dir() / "tokenizer.model"), True
    if ckpt_dir is None or tokenizer_path is None:
        given, missing = ("--ckpt_dir", "--tokenizer_path") if tokenizer_path is None else ("--tokenizer_path", "--ckpt_dir")
        raise ValueError(f"{given} was given without {missing}: pass both for your own weights, or neither for the "
                         f"bundled demo model")
    return ckpt_dir, tokenizer_path, False


def stop_ids(value, generator) -> Tuple[int, ...]:
    """A command line's --stop_token_ids (an int or a list of ints, as fire parses them), checked against the vocabulary."""
    from llama.request import check_stop_token_ids

    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        return check_stop_token_ids(list(ids) if isinstance(ids, (list, tuple)) else ids, generator.model.vocab_size)
    except ValueError as e:
        raise ValueError(f"--stop_token_ids: {e}") from None
