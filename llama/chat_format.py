"""The Llama 2 chat prompt format: [INST] ... [/INST] turns with an optional <<SYS>> block."""

from typing import List, Literal, Optional, TypedDict

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def _check_dialog(dialog: Dialog, index: int) -> None:
    """Raise ValueError unless dialog is [system?] user (assistant user)* with string contents."""
    where = f"dialog {index}"
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of messages, got {dialog!r}")
    for message in dialog:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"{where}: each message needs a 'role' and a str 'content', got {message!r}")
    roles = [m["role"] for m in dialog]
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
    if len(turns) % 2 == 0 or turns != expected:
        raise ValueError(
            f"{where} has roles {roles}: after an optional leading 'system', roles must alternate "
            f"'user', 'assistant', ... and end with 'user'"
        )


def has_special_tags(dialog: Dialog) -> bool:
    """True when a message contains [INST], [/INST], <<SYS>> or <</SYS>>, which users may not inject."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog, index: int = 0) -> List[int]:
    """Token ids of a dialog ending in a user message, ready for the assistant's reply.

    index only names the dialog in error messages.
    """
    _check_dialog(dialog, index)
    if dialog[0]["role"] == "system":
        first_user = dialog[1]
        merged = {"role": first_user["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + first_user["content"]}
        dialog = [merged] + list(dialog[2:])
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def encode_dialogs(tokenizer: Tokenizer, dialogs: List[Dialog]) -> List[Optional[List[int]]]:
    """encode_dialog for each dialog (all checked first); None for a dialog carrying special tags."""
    for i, dialog in enumerate(dialogs):
        _check_dialog(dialog, i)
    return [None if has_special_tags(d) else encode_dialog(tokenizer, d, i) for i, d in enumerate(dialogs)]
