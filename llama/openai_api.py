"""OpenAI's completions and chat completions API: checking request bodies, and shaping responses.

Requests become engine RequestSpecs (one per prompt and choice); every wrong field is an APIError
naming the field, which the server answers with status 400 in OpenAI's error shape.
"""

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, List, Optional

from llama.chat_format import UNSAFE_ERROR, encode_dialogs
from llama.engine import Engine
from llama.request import Completion, RequestSpec, check_prompt
from llama.sampling import SamplingParams

MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, type: str = "invalid_request_error",
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param)


def _get(body: dict, name: str, kind, default=None, check=None, expected: str = ""):
    """body[name] if present and not null, checked to be of kind (and check(value)), else default."""
    value = body.get(name)
    if value is None:
        return default
    is_bool = isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not is_bool and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not is_bool
    else:
        ok = isinstance(value, kind)
    if not ok or (check is not None and not check(value)):
        raise _bad(name, f"'{name}' must be {expected or kind.__name__}, got {value!r}")
    return value


@dataclass
class Parsed:
    """A checked request: the prompts (token ids), how many choices each, and the specs to run."""

    model: str
    prompts: List[List[int]]  # None for a refused dialog
    n: int
    specs: List[Optional[RequestSpec]]  # per choice, prompt-major; None: refused (special tags)
    stream: bool
    include_usage: bool
    echo: bool = False
    logprobs: Optional[int] = None  # completions: top alternatives; chat: top_logprobs (with logprobs true)
    created: int = field(default_factory=lambda: int(time.time()))


def _sampling(body: dict, seed_offset: int) -> SamplingParams:
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not 1 <= len(stop) <= MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise _bad("stop", f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP} of them, got {body['stop']!r}")
    seed = _get(body, "seed", int)
    params = dict(
        temperature=_get(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
        top_p=_get(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=_get(body, "top_k", int, None, lambda v: v >= 1, "an integer >= 1"),
        repetition_penalty=_get(body, "repetition_penalty", float, 1.0, lambda v: 0 < v <= 10, "a number in (0, 10]"),
        frequency_penalty=_get(body, "frequency_penalty", float, 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
        presence_penalty=_get(body, "presence_penalty", float, 0.0, lambda v: -2 <= v <= 2, "a number from -2 to 2"),
        stop=stop or (),
        seed=None if seed is None else seed + seed_offset,
    )
    return SamplingParams(**params)


def _common(body: Any, model_name: str) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", f"'model' is required and must be a string (this server serves {model_name!r})")
    if model != model_name:
        raise APIError(400, f"the model {model!r} does not exist; this server serves {model_name!r}", "model", code="model_not_found")
    if body.get("logit_bias"):
        raise _bad("logit_bias", "'logit_bias' is not supported")
    stream = _get(body, "stream", bool, False, expected="a boolean")
    options = _get(body, "stream_options", dict, {}, expected="an object")
    include_usage = _get(options, "include_usage", bool, False, expected="a boolean")
    if options and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    n = _get(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"an integer from 1 to {MAX_N}")
    ignore_eos = _get(body, "ignore_eos", bool, False, expected="a boolean")  # vLLM's extension, for benchmarks
    return {"model": model, "stream": stream, "include_usage": include_usage, "n": n, "ignore_eos": ignore_eos}


def _max_tokens(body: dict, name: str, prompt: List[int], max_seq_len: int, where: str) -> Optional[int]:
    max_tokens = _get(body, name, int, None, lambda v: v >= 1, "an integer >= 1")
    room = max_seq_len - len(prompt)
    if room < 1:
        raise _bad("messages" if where == "messages" else "prompt",
                   f"{where} has {len(prompt)} tokens, which leaves no room to generate within this server's context "
                   f"of {max_seq_len} tokens; shorten it")
    if max_tokens is not None and max_tokens > room:
        raise _bad(name, f"{where} has {len(prompt)} tokens and {name} is {max_tokens}: together more than this "
                         f"server's context of {max_seq_len} tokens; lower {name} to at most {room} or shorten the prompt")
    return max_tokens


def _prompts(body: dict, tokenizer, vocab: int, max_seq_len: int) -> List[List[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N * 4:
        raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists "
                             f"(at most {MAX_N * 4} prompts)")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise _bad("prompt", f"prompt {i} is empty")
            try:
                p = tokenizer.encode(p, bos=True, eos=False)
            except (TypeError, RuntimeError, UnicodeError) as e:
                raise _bad("prompt", f"prompt {i} could not be encoded: {e}") from e
        try:
            out.append(check_prompt(p, vocab, max_seq_len + 1, f"prompt {i}"))  # the length is checked with max_tokens
        except ValueError as e:
            raise _bad("prompt", str(e)) from e
    return out


def parse_completion(body: Any, engine: Engine, tokenizer, model_name: str) -> Parsed:
    common = _common(body, model_name)
    max_seq_len = engine.max_seq_len
    prompts = _prompts(body, tokenizer, engine.model.vocab_size, max_seq_len)
    echo = _get(body, "echo", bool, False, expected="a boolean")
    logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
    if body.get("suffix"):
        raise _bad("suffix", "'suffix' is not supported")
    specs = []
    for i, prompt in enumerate(prompts):
        max_tokens = _max_tokens(body, "max_tokens", prompt, max_seq_len, f"prompt {i}")
        for j in range(common["n"]):
            specs.append(RequestSpec(prompt, _sampling(body, j), max_tokens or max_seq_len, (), logprobs is not None,
                                     logprobs or 0, echo and logprobs is not None, common["ignore_eos"]))
    return Parsed(common["model"], prompts, common["n"], specs, common["stream"], common["include_usage"], echo, logprobs)


def parse_chat(body: Any, engine: Engine, tokenizer, model_name: str) -> Parsed:
    common = _common(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    dialog = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise _bad("messages", f"message {i} must be an object with 'role' (system, user or assistant) and string 'content'")
        dialog.append({"role": m["role"], "content": m["content"]})
    try:
        (prompt,) = encode_dialogs(tokenizer, [dialog])
    except (ValueError, TypeError, UnicodeError) as e:
        raise _bad("messages", f"messages: {e}") from e
    want_logprobs = _get(body, "logprobs", bool, False, expected="a boolean")
    top = _get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "an integer from 0 to 20")
    if top and not want_logprobs:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    specs: List[Optional[RequestSpec]] = [None] * common["n"]
    if prompt is not None:
        try:
            check_prompt(prompt, engine.model.vocab_size, engine.max_seq_len + 1, "messages")
        except ValueError as e:
            raise _bad("messages", str(e)) from e
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _max_tokens(body, name, prompt, engine.max_seq_len, "messages")
        specs = [RequestSpec(prompt, _sampling(body, j), max_tokens or engine.max_seq_len, (), want_logprobs, top,
                             ignore_eos=common["ignore_eos"]) for j in range(common["n"])]
    return Parsed(common["model"], [prompt], common["n"], specs, common["stream"], common["include_usage"],
                  logprobs=top if want_logprobs else None)


# Responses ---------------------------------------------------------------------------------------------

def finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(parsed: Parsed, completions: List[Optional[Completion]]) -> dict:
    prompt_tokens = sum(len(p) for p in parsed.prompts if p is not None)
    generated = sum(len(c.tokens) for c in completions if c is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def completion_logprobs(tokenizer, tokens: List[int], lps: List[Optional[float]], tops: List[dict], start: int = 0) -> dict:
    """The completions API's logprobs object for tokens; text offsets count from start."""
    pieces = [tokenizer.token_text(t) for t in tokens]
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "tokens": pieces,
        "token_logprobs": lps,
        "top_logprobs": [{tokenizer.token_text(t): lp for t, lp in top.items()} for top in tops] if tops else None,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, tokens: List[int], lps: List[float], tops: List[dict]) -> dict:
    def entry(token: int, lp: float) -> dict:
        return {"token": tokenizer.token_text(token), "logprob": lp, "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (tops[i].items() if tops else [])]}
                        for i, (t, lp) in enumerate(zip(tokens, lps))]}


def completion_choice(parsed: Parsed, tokenizer, index: int, done: Completion) -> dict:
    prompt = parsed.prompts[index // parsed.n]
    text = done.text
    logprobs = None
    if parsed.echo:
        full = tokenizer.decode(prompt + done.tokens)
        text = full[: len(full) - (len(tokenizer.decode(done.tokens)) - len(done.text))]
        if parsed.logprobs is not None:
            lps = [None] + done.prompt_logprobs[1:] + done.logprobs
            tops = ([{}] * len(prompt) + done.top_logprobs) if parsed.logprobs else []
            logprobs = completion_logprobs(tokenizer, prompt + done.tokens, lps, tops)
    elif parsed.logprobs is not None:
        logprobs = completion_logprobs(tokenizer, done.tokens, done.logprobs, done.top_logprobs if parsed.logprobs else [])
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(done.finish_reason)}


def chat_choice(parsed: Parsed, tokenizer, index: int, done: Optional[Completion]) -> dict:
    if done is None:  # refused: the reply chat_completion gives
        return {"index": index, "message": {"role": "assistant", "content": UNSAFE_ERROR}, "logprobs": None,
                "finish_reason": "stop"}
    logprobs = None
    if parsed.logprobs is not None:
        logprobs = chat_logprobs(tokenizer, done.tokens, done.logprobs, done.top_logprobs)
    return {"index": index, "message": {"role": "assistant", "content": done.text}, "logprobs": logprobs,
            "finish_reason": finish_reason(done.finish_reason)}
