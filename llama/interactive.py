"""A multi-turn chat loop on top of `Llama.stream_chat_completion`, used by `example_chat_completion.py --interactive`.

Each line read is one user message. The reply streams out as it is generated, prefixed with
"Assistant: " and ended with a newline, and joins the history, so the next message is answered
in the context of the whole conversation (Llama 2 chat format, optional system prompt first).

Commands (a line starting with one of these):

    /reset          forget the conversation, keep the system prompt
    /system TEXT    set the system prompt to TEXT and forget the conversation ("/system" alone removes it)
    /exit           end the session (so does end of input, Ctrl-D)
    /help           list the commands

Fitting max_seq_len: before each reply the prompt (system prompt + history + the new message) must
leave room for at least `reply_room(max_seq_len, max_gen_len)` = min(max_gen_len or 64, max_seq_len // 2)
new tokens (at least 1). While it does not, the oldest user/assistant exchange is dropped for good
(the system prompt never is) and a notice like "[dropped the oldest exchange to fit max_seq_len=512]"
is printed. If the system prompt and the new message alone leave too little room, the message is
skipped with a notice and the history is kept as it was. The reply itself may still stop earlier, at
max_gen_len or at max_seq_len.

Ctrl-C while a reply streams stops that reply (`stream.close()`); what was printed of it stays in
the history and the session goes on. Ctrl-C while waiting for input discards the line being typed.
This works in a single process only: under torchrun the terminal's Ctrl-C reaches the launcher,
which ends the whole job (the ranks could not agree on where a reply stopped anyway), so there
`catch_interrupt` is off and KeyboardInterrupt propagates.

Under model parallelism every rank runs `run_chat` with the same arguments: rank 0 reads the input
and `shared_reader` broadcasts each line to the others, so all ranks build the same prompts and
iterate the stream in lockstep; only rank 0 should be given real `write`/`notify` functions.
"""

import sys
from datetime import timedelta
from typing import Callable, Iterable, List, Optional, Tuple

from llama.chat_format import SPECIAL_TAGS, UNSAFE_ERROR, Dialog, Message, encode_dialog, has_special_tags

DEFAULT_REPLY_ROOM = 64
COMMANDS = {
    "/reset": "forget the conversation, keep the system prompt",
    "/system": "/system TEXT sets the system prompt and forgets the conversation; /system alone removes it",
    "/exit": "end the session (end of input, Ctrl-D, does too)",
    "/help": "list the commands",
}

#: The first notice of a session, so that it does not open on a bare "User:".
GREETING = "[one message per line; /help lists the commands; /exit or Ctrl-D ends the chat]"

ReadLine = Callable[[], Optional[str]]  # a line without its newline, or None at end of input
Write = Callable[[str], None]


def reply_room(max_seq_len: int, max_gen_len: Optional[int]) -> int:
    """Tokens the prompt must leave free for the reply: min(max_gen_len or 64, max_seq_len // 2), at least 1."""
    return max(1, min(max_gen_len or DEFAULT_REPLY_ROOM, max_seq_len // 2))


def _has_special_tags(text: str) -> bool:
    return has_special_tags([{"role": "user", "content": text}])


class ChatHistory:
    """A system prompt (or None) and the user/assistant exchanges so far, oldest first."""

    def __init__(self, system: Optional[str] = None):
        self.system = system
        self.exchanges: List[Tuple[str, str]] = []

    def clear(self) -> None:
        self.exchanges = []

    def set_system(self, system: Optional[str]) -> None:
        """A new system prompt (None for none) starts a new conversation."""
        self.system = system
        self.exchanges = []

    def dialog(self, user: str, exchanges: Optional[List[Tuple[str, str]]] = None) -> Dialog:
        """The dialog that asks for the reply to user: system?, past exchanges, then user."""
        messages: List[Message] = [{"role": "system", "content": self.system}] if self.system is not None else []
        for question, answer in self.exchanges if exchanges is None else exchanges:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": user})
        return messages

    def fit(self, tokenizer, user: str, budget: int) -> Tuple[Optional[Dialog], int, int]:
        """Drop the fewest oldest exchanges so that the prompt for user has at most budget tokens.

        Returns (dialog, exchanges to drop, prompt tokens); dialog is None when even the system prompt
        plus user alone exceed the budget (prompt tokens then counts that minimal prompt).
        Nothing is changed here; apply the drop with `drop(n)` once the turn goes ahead.
        """
        for dropped in range(len(self.exchanges) + 1):
            dialog = self.dialog(user, self.exchanges[dropped:])
            n_tokens = len(encode_dialog(tokenizer, dialog))
            if n_tokens <= budget:
                return dialog, dropped, n_tokens
        return None, len(self.exchanges), n_tokens

    def drop(self, n: int) -> None:
        del self.exchanges[:n]

    def add(self, user: str, reply: str) -> None:
        self.exchanges.append((user, reply))


def run_chat(
    generator,
    read_line: ReadLine,
    write: Write,
    *,
    notify: Optional[Write] = None,
    system: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: Optional[int] = None,
    catch_interrupt: bool = True,
) -> ChatHistory:
    """Chat until /exit or end of input; returns the history as it ended. The first notice is GREETING.

    generator: a `Llama` (or anything with `stream_chat_completion(dialog, ...)`, `tokenizer` and
    `model.params.max_seq_len`). read_line() returns the next input line, or None at end of input.
    write(text) prints reply text (it should flush: replies arrive a delta at a time); notify(text)
    prints one notice line (defaults to write). temperature, top_p and max_gen_len apply to each reply.
    catch_interrupt: stop only the current reply on KeyboardInterrupt (single process only).
    """
    notify = notify or (lambda text: write(text + "\n"))
    tokenizer = generator.tokenizer
    max_seq_len = generator.model.params.max_seq_len
    budget = max_seq_len - reply_room(max_seq_len, max_gen_len)
    if system is not None and _has_special_tags(system):
        raise ValueError(f"the system prompt may not contain the chat format's tags {SPECIAL_TAGS}")
    history = ChatHistory(system or None)

    notify(GREETING)
    while True:
        text = _next_message(read_line, write, notify, catch_interrupt)
        if text is None:
            break
        if not text:
            continue

        handled = _run_command(text, history, notify)
        if handled == "exit":
            break
        if handled:
            continue
        if _has_special_tags(text):
            notify(f"[{UNSAFE_ERROR} Message skipped]")
            continue

        dialog, dropped, n_tokens = history.fit(tokenizer, text, budget)
        if dialog is None:
            notify(
                f"[message skipped: with the system prompt it takes {n_tokens} tokens, which leaves fewer than "
                f"{max_seq_len - budget} of max_seq_len={max_seq_len} for the reply; shorten it or raise --max_seq_len]"
            )
            continue
        if dropped:
            history.drop(dropped)
            what = "the oldest exchange" if dropped == 1 else f"the {dropped} oldest exchanges"
            notify(f"[dropped {what} to fit max_seq_len={max_seq_len}]")

        reply = _stream_reply(generator, dialog, write, notify, catch_interrupt,
                              temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
        if reply is not None:
            history.add(text, reply)
    return history


def _next_message(read_line: ReadLine, write: Write, notify: Write, catch_interrupt: bool) -> Optional[str]:
    """The next input line, stripped: None at end of input, "" for nothing to send (a blank or unreadable line, or
    Ctrl-C at the prompt)."""
    try:
        line = read_line()
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        write("\n")
        return ""
    if line is None:
        return None
    if not _is_valid_unicode(line):
        notify("[the line could not be read: it is not valid UTF-8; nothing was sent]")
        return ""
    return line.strip()


def _run_command(text: str, history: ChatHistory, notify: Write) -> Optional[str]:
    """Carry out text if it is a command: "exit" for /exit, "done" for any other command (an unknown one
    gets a notice), None when text is a message."""
    command, argument = (text.split(maxsplit=1) + [""])[:2]
    if command == "/exit":
        return "exit"
    if command == "/reset":
        history.clear()
        notify("[conversation cleared]")
    elif command == "/system":
        if _has_special_tags(argument):
            notify(f"[the system prompt may not contain {', '.join(SPECIAL_TAGS)}; nothing changed]")
        else:
            history.set_system(argument or None)
            notify("[system prompt set; conversation cleared]" if argument else "[system prompt removed; conversation cleared]")
    elif command == "/help":
        for name, meaning in COMMANDS.items():
            notify(f"  {name}: {meaning}")
    elif command.startswith("/") and command[1:].isalpha():
        notify(f"[unknown command {command}; commands: {' '.join(COMMANDS)}]")
    else:
        return None
    return "done"


def _stream_reply(generator, dialog: Dialog, write: Write, notify: Write, catch_interrupt: bool, **sampling) -> Optional[str]:
    """Print "Assistant: " and the reply as it streams, then a newline.

    Returns the reply's text (what was printed of it, when interrupted), or None when the request
    was refused (ValueError before any text; every rank raises it alike, so all skip the turn).
    """
    stream = None
    parts: List[str] = []
    try:
        stream = generator.stream_chat_completion(dialog, **sampling)
        for delta in stream:
            if not parts:
                write("Assistant: ")
            parts.append(delta)
            write(delta)
    except ValueError as e:
        if parts:
            raise
        notify(f"[error: {e}]")
        return None
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        if stream is not None:
            stream.close()
        write(("" if parts else "Assistant: ") + "\n")
        notify("[reply interrupted]")
        return "".join(parts)
    write(("" if parts else "Assistant: ") + "\n")
    return "".join(parts)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shared_reader(read_line: ReadLine) -> ReadLine:
    """read_line on rank 0, its lines broadcast to every rank; read_line itself when there is one process.

    Call it on every rank after `Llama.build` (which joins the process group). The broadcast goes over
    a Gloo group of its own with a long timeout: the other ranks wait in it for as long as the user
    takes to type, and the default group's timeout (10 min for NCCL) would end the job.
    """
    if world_size() == 1:
        return read_line
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(days=30))
    rank = dist.get_rank()

    def read() -> Optional[str]:
        box = [read_line() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    return read


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stdin_reader(stream=None, prompt: str = "User: ") -> ReadLine:
    """Lines from stdin; prompt is shown only when stdin is a terminal, so piped output holds just the replies.
    Bytes that are not UTF-8 come through as lone surrogates (which run_chat reports), never as an exception."""
    stream = stream if stream is not None else sys.stdin
    if stream is sys.stdin and stream.isatty():
        def read() -> Optional[str]:
            try:
                return input(prompt)
            except EOFError:
                sys.stdout.write("\n")
                return None
            except UnicodeDecodeError as e:
                return e.object.decode("utf-8", errors="surrogateescape")
        return read

    def read_pipe() -> Optional[str]:
        raw = getattr(stream, "buffer", None)
        line = raw.readline().decode("utf-8", errors="surrogateescape") if raw is not None else stream.readline()
        return line if line else None

    return read_pipe


def printer(stream=None, end: str = "") -> Write:
    """write(text) to stream (stdout by default) followed by end, flushed at once so that deltas show as they arrive."""
    def write(text: str) -> None:
        out = stream if stream is not None else sys.stdout
        out.write(text + end)
        out.flush()
    return write


def lines(items: Iterable[str]) -> ReadLine:
    """A read_line over a list of lines (then None), for scripts and tests."""
    it = iter(items)
    return lambda: next(it, None)
