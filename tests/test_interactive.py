"""example_chat_completion.py --interactive end to end (through a pipe, under torchrun and plain python),
and the chat loop of llama/interactive.py with a fake generator (Ctrl-C, history truncation)."""

import os
import re

import pytest

from llama import Llama
from llama.chat_format import encode_dialog
from llama.interactive import GREETING, ChatHistory, lines, reply_room, run_chat
from tests.conftest import REPO, check_exit, launch

MAX_GEN_LEN = 8
SYSTEM = "Always answer with Haiku"
DROP_NOTICE = re.compile(r"\[dropped the (?:oldest exchange|(\d+) oldest exchanges) to fit max_seq_len=(\d+)\]")


@pytest.fixture(scope="module")
def reference(tiny_checkpoints, tiny_tokenizer_path):
    """reference(max_seq_len): a one-process Llama on the 1-shard checkpoint (the same weights as the 2-shard one)."""
    built = {}

    def get(max_seq_len: int) -> Llama:
        if max_seq_len not in built:
            built[max_seq_len] = Llama.build(str(tiny_checkpoints[(None, 1)]), str(tiny_tokenizer_path), max_seq_len, 1, device="cpu")
        return built[max_seq_len]

    return get


def chat_cli(ckpt, tokenizer, stdin, max_seq_len, nproc=0, extra=()):
    proc = launch(
        ["example_chat_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer, "--interactive",
         "--temperature", "0", "--device", "cpu", "--max_gen_len", MAX_GEN_LEN, "--max_seq_len", max_seq_len, *extra],
        nproc, timeout=120, input=stdin,
    )
    check_exit(proc)
    return proc


def printed_replies(stdout: str) -> list:
    """The replies in stdout, which holds nothing else (no input prompt when stdin is a pipe): one "Assistant: " line each."""
    assert stdout.endswith("\n"), repr(stdout)
    out = stdout[:-1].split("\n")
    assert all(line.startswith("Assistant: ") for line in out), stdout
    return [line[len("Assistant: "):] for line in out]


def expected_reply(generator: Llama, dialog) -> str:
    return generator.chat_completion([dialog], temperature=0, max_gen_len=MAX_GEN_LEN)[0]["generation"]["content"]


def fit(generator: Llama, system, history: list, user: str) -> tuple:
    """The documented truncation, written out again: drop the oldest exchanges until the prompt leaves
    min(max_gen_len, max_seq_len // 2) tokens for the reply. Returns (dialog, how many were dropped)."""
    max_seq_len = generator.model.params.max_seq_len
    budget = max_seq_len - min(MAX_GEN_LEN, max_seq_len // 2)
    for dropped in range(len(history) + 1):
        dialog = [{"role": "system", "content": system}] if system else []
        for question, answer in history[dropped:]:
            dialog += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        dialog.append({"role": "user", "content": user})
        if len(encode_dialog(generator.tokenizer, dialog)) <= budget:
            return dialog, dropped
    return None, 0


TURNS = [
    "Hello world!",
    "Paris is the capital of France.",
    "Llamas live in the Andes mountains.",
    "The quick brown fox jumps.",
    "Numbers: 1 2 3",
]
TORCHRUN_MAX_SEQ_LEN = 120


def test_torchrun_two_ranks_replies_equal_chat_completion_and_old_turns_drop(tiny_checkpoints, tiny_tokenizer_path, reference):
    proc = chat_cli(
        tiny_checkpoints[(None, 2)], tiny_tokenizer_path, "".join(t + "\n" for t in TURNS), TORCHRUN_MAX_SEQ_LEN,
        nproc=2, extra=["--system", SYSTEM],
    )
    replies = printed_replies(proc.stdout)  # stdout holds each reply once: only rank 0 printed (not fairscale's notes)
    assert len(replies) == len(TURNS)
    assert proc.stderr.count(GREETING) == 1

    generator = reference(TORCHRUN_MAX_SEQ_LEN)
    history, drops = [], []
    for turn, (user, reply) in enumerate(zip(TURNS, replies), start=1):
        dialog, dropped = fit(generator, SYSTEM, history, user)
        assert dialog[0] == {"role": "system", "content": SYSTEM}  # never dropped
        assert reply == expected_reply(generator, dialog), f"turn {turn}: {dialog}"
        del history[:dropped]
        history.append((user, reply))
        drops += [turn] * dropped
    # The max_seq_len is chosen so that the first turns fit and the third or fourth drops the oldest exchange.
    assert drops and drops[0] in (3, 4), drops
    notices = DROP_NOTICE.findall(proc.stderr)
    assert sum(int(n or 1) for n, _ in notices) == len(drops), proc.stderr
    assert all(limit == str(TORCHRUN_MAX_SEQ_LEN) for _, limit in notices)


def test_commands_reset_system_and_exit(tiny_checkpoints, tiny_tokenizer_path, reference):
    stdin = "\n".join([
        TURNS[0],
        f"/system {SYSTEM}",  # sets the system prompt and forgets the first exchange
        TURNS[1],
        "/reset",  # forgets the conversation, keeps the system prompt
        "",  # blank lines are skipped
        TURNS[1],
        "/bogus",
        "/system",  # removes the system prompt
        TURNS[0],
        "/exit",
        TURNS[2],  # never read
    ]) + "\n"
    proc = chat_cli(tiny_checkpoints[(None, 1)], tiny_tokenizer_path, stdin, 256)
    replies = printed_replies(proc.stdout)
    generator = reference(256)
    alone = expected_reply(generator, [{"role": "user", "content": TURNS[0]}])
    with_system = expected_reply(generator, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[1]}])
    assert replies == [alone, with_system, with_system, alone]
    assert "[unknown command /bogus" in proc.stderr
    assert "[conversation cleared]" in proc.stderr and "[system prompt set; conversation cleared]" in proc.stderr


def test_end_of_input_ends_cleanly_and_a_message_too_long_is_skipped(tiny_checkpoints, tiny_tokenizer_path, reference):
    too_long = "The quick brown fox jumps over the lazy dog. " * 8
    # The last line has no newline: end of input comes right after it.
    stdin = f"{TURNS[0]}\n{too_long}\n{TURNS[1]}"
    proc = chat_cli(tiny_checkpoints[(None, 1)], tiny_tokenizer_path, stdin, 128, extra=["--system", SYSTEM])
    replies = printed_replies(proc.stdout)
    assert len(replies) == 2
    assert "[message skipped: " in proc.stderr and "max_seq_len=128" in proc.stderr
    generator = reference(128)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    assert replies[0] == expected_reply(generator, first)
    # The skipped message left the history as it was.
    second = first + [{"role": "assistant", "content": replies[0]}, {"role": "user", "content": TURNS[1]}]
    assert replies[1] == expected_reply(generator, second)


def test_a_line_that_is_not_utf8_is_reported_and_the_chat_goes_on():
    """Bytes that are not UTF-8 on stdin (decoded strictly, or into lone surrogates) never end the session."""
    import subprocess
    import sys

    for encoding in ({}, {"PYTHONIOENCODING": "utf-8"}):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **encoding)
        proc = subprocess.run([sys.executable, "example_chat_completion.py", "--interactive", "--max_gen_len", "6",
                               "--device", "cpu"], input=b"Hi \xff\xfe there\nTell me a story\n", env=env, cwd=REPO,
                              capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
        assert b"[the line could not be read: it is not valid UTF-8; nothing was sent]" in proc.stderr
        assert proc.stdout.count(b"Assistant: ") == 1  # the second line got its reply


# ---- the loop itself, with a fake generator


class FakeTokenizer:
    """One token per word, plus BOS/EOS."""

    def encode(self, s, bos, eos):
        return [1] * bos + [3] * len(s.split()) + [2] * eos


class FakeStream:
    def __init__(self, deltas, interrupt_after=None):
        self.deltas, self.interrupt_after, self.closed, self.i = deltas, interrupt_after, False, 0
        self.stats = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.closed:
            raise StopIteration
        if self.i == self.interrupt_after:
            raise KeyboardInterrupt
        if self.i == len(self.deltas):
            self.stats = {"prompt_tokens": 0, "generated_tokens": len(self.deltas), "stop_reason": "eos"}
            raise StopIteration
        self.i += 1
        return self.deltas[self.i - 1]

    def close(self):
        self.closed = True


class FakeGenerator:
    """Replies with the scripted streams in turn and records every request."""

    def __init__(self, streams, max_seq_len=64):
        self.streams = list(streams)
        self.requests = []
        self.tokenizer = FakeTokenizer()
        self.model = type("Model", (), {"params": type("Params", (), {"max_seq_len": max_seq_len})()})()

    def stream_chat_completion(self, dialog, **sampling):
        self.requests.append((dialog, sampling))
        return self.streams.pop(0)


def run(generator, inputs, **kwargs):
    out, notes = [], []
    history = run_chat(generator, lines(inputs), out.append, notify=notes.append, **kwargs)
    return "".join(out), notes, history


def test_ctrl_c_stops_the_reply_and_the_session_goes_on():
    interrupted = FakeStream(["Hel", "lo", " there", " friend"], interrupt_after=2)
    generator = FakeGenerator([interrupted, FakeStream(["Fine."])])
    out, notes, history = run(generator, ["hi", "how are you"], temperature=0.3, top_p=0.5, max_gen_len=5)
    assert interrupted.closed
    assert out == "Assistant: Hello\nAssistant: Fine.\n"
    assert notes == [GREETING, "[reply interrupted]"]
    # What was shown of the stopped reply stays in the history.
    dialog, sampling = generator.requests[1]
    assert dialog == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "how are you"}]
    assert sampling == {"temperature": 0.3, "top_p": 0.5, "max_gen_len": 5}
    assert history.exchanges == [("hi", "Hello"), ("how are you", "Fine.")]


def test_ctrl_c_before_the_first_delta_and_at_the_prompt():
    stream = FakeStream(["never shown"], interrupt_after=0)
    generator = FakeGenerator([stream, FakeStream(["ok"])])
    inputs = iter(["hi", KeyboardInterrupt, "again"])

    def read_line():
        item = next(inputs, None)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    out, notes = [], []
    run_chat(generator, read_line, out.append, notify=notes.append)
    assert stream.closed
    # The interrupted reply shows as empty; the interrupted prompt is dropped with a new line.
    assert "".join(out) == "Assistant: \n\nAssistant: ok\n"
    assert len(generator.requests) == 2


def test_ctrl_c_propagates_when_not_caught():
    generator = FakeGenerator([FakeStream(["a", "b"], interrupt_after=1)])
    with pytest.raises(KeyboardInterrupt):
        run(generator, ["hi"], catch_interrupt=False)


def test_history_drops_oldest_exchanges_keeps_system_and_skips_what_cannot_fit():
    # max_seq_len 40, max_gen_len 8: prompts may take 32 tokens. With the fake tokenizer an exchange
    # of two 3-word messages costs 2 + 3 + 3 + 2 tags = 10 tokens plus BOS/EOS, the system prompt 5 + tags.
    generator = FakeGenerator([FakeStream(["one two three"]) for _ in range(5)], max_seq_len=40)
    tokenizer = generator.tokenizer
    inputs = ["a b c", "d e f", "g h i", "j k l", " ".join(["w"] * 30), "m n o"]
    out, notes, history = run(generator, inputs, system="be nice to me", max_gen_len=8)
    for dialog, _ in generator.requests:
        assert dialog[0] == {"role": "system", "content": "be nice to me"}
        assert len(encode_dialog(tokenizer, dialog)) <= 40 - 8
    # The first exchange costs 16 tokens with the system prompt, later ones 10, the new message 6:
    # the fourth turn and the last one each drop the oldest exchange.
    users = [[m["content"] for m in dialog if m["role"] == "user"] for dialog, _ in generator.requests]
    assert users == [["a b c"], ["a b c", "d e f"], ["a b c", "d e f", "g h i"], ["d e f", "g h i", "j k l"],
                     ["g h i", "j k l", "m n o"]]
    assert [n for n in notes if n.startswith("[dropped")] == ["[dropped the oldest exchange to fit max_seq_len=40]"] * 2
    assert sum(n.startswith("[message skipped: ") for n in notes) == 1
    assert out.count("Assistant: ") == 5  # the 30-word message got no reply
    assert [q for q, _ in history.exchanges] == ["g h i", "j k l", "m n o"]


def test_fit_and_reply_room():
    assert reply_room(512, None) == 64 and reply_room(512, 1000) == 256 and reply_room(96, 8) == 8 and reply_room(1, None) == 1
    history = ChatHistory("sys")
    history.add("a b", "c d")
    history.add("e f", "g h")
    tokenizer = FakeTokenizer()
    full = history.dialog("x")
    n = len(encode_dialog(tokenizer, full))
    assert history.fit(tokenizer, "x", n) == (full, 0, n)
    dialog, dropped, m = history.fit(tokenizer, "x", n - 1)
    assert dropped == 1 and m < n and dialog == [full[0]] + full[3:]
    assert history.fit(tokenizer, "x y z " * 20, n)[0] is None
    assert len(history.exchanges) == 2  # fit changes nothing


def test_the_session_opens_on_how_to_get_help_and_leave():
    """Not on a bare "User:": the first notice names /help and the ways out."""
    out, notes, _ = run(FakeGenerator([]), ["/exit"])
    assert out == "" and notes == [GREETING]
    assert "/help" in GREETING and "/exit" in GREETING and "Ctrl-D" in GREETING


def test_special_tags_are_refused_without_generation():
    generator = FakeGenerator([FakeStream(["ok"])])
    out, notes, _ = run(generator, ["tell me [INST] something", "/system <<SYS>>", "hello"])
    assert out == "Assistant: ok\n" and len(generator.requests) == 1
    assert generator.requests[0][0] == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="system prompt"):
        run(FakeGenerator([]), [], system="[/INST] hi")
