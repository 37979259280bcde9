"""Running a command-line entry point (a fire CLI) so that a person reads what went wrong, not a traceback.

Every command of the package (the two examples, python -m llama.server, llama.convert, llama.bench,
llama.bench_serving, llama.bench_http, llama.perplexity, llama.evaluate, llama.quality) runs through run():

- A user error prints "error: <what is wrong and how to fix it>" and a hint on LLAMA_DEBUG on stderr, and exits
  with 2. User errors are ValueError (a bad flag value, a refused argument, a CheckpointError) and OSError (a missing
  file, a full disk, a port in use, a server that cannot be reached): the library raises these for what the caller
  or the machine got wrong, and their messages say so.
- A flag whose parameter is typed str keeps its text as typed (fire alone reads 007 as the int 7): text_flags.
- Ctrl-C exits with 130, quietly.
- Any other exception is a bug and keeps its traceback.
- LLAMA_DEBUG=1 in the environment shows the full traceback of user errors and Ctrl-C too.

Under torchrun every rank usually meets the same error; the printing rank (rank 0) prints it. Another rank waits a
few seconds first, in which the launcher ends it when rank 0 failed too; it prints its error (naming its rank) only
when it is still running then, when the error was its own.
"""

import ast
import functools
import inspect
import os
import signal
import sys
import threading
import time
import typing
from typing import Any, Callable, List, Optional, Union

DEBUG_VARIABLE = "LLAMA_DEBUG"
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT
PEER_GRACE_S = 5.0  # how long a rank other than 0 waits for the launcher before it prints its own error


def debug() -> bool:
    """Whether LLAMA_DEBUG asks for full tracebacks (set, and not "" or "0")."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def run(component: Union[Callable, dict], **fire_kwargs: Any) -> None:
    """fire.Fire(component, **fire_kwargs), with user errors and Ctrl-C reported as described above; component is a
    function or a dict of commands to functions."""
    import fire

    argv = fire_kwargs.pop("command", sys.argv[1:])
    if isinstance(argv, (list, tuple)):
        argv = text_flags(component, list(argv))
    try:
        fire.Fire(_readable_help(component), command=argv, **fire_kwargs)
    except KeyboardInterrupt as e:
        if debug():
            raise
        _exit(e, EXIT_INTERRUPTED, None)
    except USER_ERRORS as e:
        if debug():
            raise
        _exit(e, EXIT_USER_ERROR, f"error: {str(e) or type(e).__name__}\n(set {DEBUG_VARIABLE}=1 for the full traceback)")


def text_flags(component: Union[Callable, dict], argv: List[str]) -> List[str]:
    """argv with the value of each flag whose parameter is typed str (or Optional[str]) written as a Python string
    literal, which fire hands on as that very text: fire reads a bare value as a Python literal, so an API key 007
    became the int 7, and a folder named 2024 a number. A value already quoted as a string literal, and None, are
    left as they are. component: a function, or a dict of commands (argv[0] names the command)."""
    function = component
    if isinstance(component, dict):
        function = component.get(argv[0]) if argv else None
    if not inspect.isfunction(function):
        return argv
    hints = typing.get_type_hints(function)
    text = {name for name in inspect.signature(function).parameters if hints.get(name) in (str, Optional[str])}
    out, i = [], 0
    while i < len(argv):
        key, has_value, value = argv[i][2:].partition("=")
        if not argv[i].startswith("--") or key.replace("-", "_") not in text:
            out.append(argv[i])
        elif has_value:
            out.append(f"--{key}={_string_literal(value)}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out += [argv[i], _string_literal(argv[i + 1])]
            i += 1
        else:
            out.append(argv[i])
        i += 1
    return out


def _string_literal(value: str) -> str:
    try:
        if value == "None" or isinstance(ast.literal_eval(value), str):
            return value
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    return repr(value)


def _exit(error: BaseException, code: int, message: Optional[str]) -> None:
    # As the interpreter does for an uncaught exception: llama/distributed.py's exit handler reads sys.last_value and
    # then does not wait at a barrier for the other ranks.
    sys.last_type, sys.last_value, sys.last_traceback = type(error), error, error.__traceback__
    if message is not None:
        from llama.distributed import global_rank, is_printing_rank

        if not is_printing_rank():
            # Ended by the launcher meanwhile when rank 0 failed as well (the usual case: every rank reads the same
            # flags and files); a rank that ignored SIGTERM (the server's other ranks) is ended again.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(PEER_GRACE_S)
            message = f"rank {global_rank() or os.environ.get('RANK', '?')}: {message}"
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _readable_help(component: Union[Callable, dict]) -> Union[Callable, dict]:
    """component with each function's Optional[X] parameters that default to None shown as X: fire's --help writes
    Optional[...] around the type of such a parameter itself, and names Optional[X] by its bare "Optional" (which
    printed "Optional[Optional]")."""
    if isinstance(component, dict):
        return {name: _readable_help(value) for name, value in component.items()}
    if not inspect.isfunction(component):
        return component
    signature = inspect.signature(component)
    parameters = []
    for p in signature.parameters.values():
        if p.default is None and typing.get_origin(p.annotation) is Union:
            rest = [a for a in typing.get_args(p.annotation) if a is not type(None)]
            p = p.replace(annotation=rest[0] if len(rest) == 1 else Union[tuple(rest)])
        parameters.append(p)

    @functools.wraps(component)
    def shown(*args, **kwargs):
        return component(*args, **kwargs)

    shown.__signature__ = signature.replace(parameters=parameters)
    return shown
