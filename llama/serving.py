"""The engine behind a server: one thread steps it; requests, aborts and outputs cross over queues.

HTTP handlers never wait for a step: they queue commands, and the stepping thread hands each
request's StepOutputs to the handler's callback. The server steps from the main thread (run()), since
torch's CPU kernels can run markedly slower in other threads; start() steps in a thread of its own.
Prometheus metrics are kept here, where the steps are.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llama.engine import Engine
from llama.request import RequestSpec, StepOutput

logger = logging.getLogger(__name__)

OnOutput = Callable[[StepOutput], None]


class QueueFull(Exception):
    """max_queue requests are already waiting for a slot."""


class ShuttingDown(Exception):
    """The server is stopping and admits nothing new."""


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, slots: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("llama_requests_running", "Requests holding a KV-cache slot", registry=r)
        self.waiting = Gauge("llama_requests_waiting", "Requests waiting for a KV-cache slot", registry=r)
        self.slots_used = Gauge("llama_kv_slots_in_use", "KV-cache slots in use", registry=r)
        Gauge("llama_kv_slots", "KV-cache slots (max_batch_size)", registry=r).set(slots)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("llama_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("llama_time_to_first_token_seconds", "From arrival to the first token", buckets=buckets, registry=r)
        self.itl = Histogram("llama_inter_token_latency_seconds", "Between two tokens of a request", buckets=buckets, registry=r)
        self.finished = Counter("llama_requests_finished", "Finished requests by reason", ["reason"], registry=r)


@dataclass
class _Tracked:
    engine_id: int
    on_output: OnOutput
    arrived: float
    last_token: Optional[float] = None


class EngineLoop:
    """Steps an Engine until stop(): run() in the calling thread, or start() in a thread of its own.

    submit(), abort() and stop() may be called from any thread. max_queue bounds the requests waiting for a
    slot (QueueFull beyond it). heartbeat_s: with model parallelism, the loop steps at least this
    often while idle, so the other ranks' follow() never waits long enough for a collective to time out.
    """

    def __init__(self, engine: Engine, max_queue: int = 256, heartbeat_s: Optional[float] = None):
        self.engine = engine
        self.max_queue = max_queue
        self.heartbeat_s = heartbeat_s
        self.metrics = Metrics(engine.model.cache_shape[0])
        self._commands: "queue.SimpleQueue" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the counters below
        self._pending = 0  # submitted, not yet in the engine's queue
        self._keys = iter(range(1 << 62))
        self._tracked: Dict[int, _Tracked] = {}  # by key; only the loop thread touches it
        self._by_engine_id: Dict[int, int] = {}
        self._stopping = False
        self._done = threading.Event()  # run() has returned

    def start(self) -> "EngineLoop":
        """Step in a new thread; returns self."""
        threading.Thread(target=self.run, name="llama-engine", daemon=True).start()
        return self

    def run(self, until: Optional[Future] = None) -> None:
        """Step in this thread until stop() (called from another thread) ends the loop; with until, return
        as well once that future is done and no request is left (run() may then be called again)."""
        if until is not None:
            until.add_done_callback(lambda _: self._wake.set())
        try:
            stopped = self._run(until)
        except BaseException:
            self._done.set()
            raise
        if stopped:
            self._done.set()

    def submit(self, spec: RequestSpec, on_output: OnOutput) -> int:
        """Queue a request; on_output gets its StepOutputs (in the loop's thread). Returns a key for abort()."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            # Requests not yet in the engine take free slots first; only those beyond them wait.
            free_slots = self.engine.model.cache_shape[0] - self.engine.num_running
            if self._pending + self.engine.num_waiting >= self.max_queue + max(0, free_slots):
                raise QueueFull(f"{self.max_queue} requests are already waiting (--max_queue); retry later")
            self._pending += 1
            key = next(self._keys)
        self._commands.put(("add", key, spec, on_output, time.perf_counter()))
        self._wake.set()
        return key

    def abort(self, key: int) -> None:
        """End a request at the next step (an unknown or finished key does nothing)."""
        self._commands.put(("abort", key))
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Admit nothing new, let running requests finish for up to timeout seconds, abort the rest, end
        the loop (and, under model parallelism, the other ranks' follow()) and wait until run() returns."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while not self._done.is_set() and (self._tracked or not self._commands.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.request_stop()
        self._done.wait()

    def request_stop(self) -> None:
        """Admit nothing new and end the loop at its next step, aborting what runs; returns at once."""
        with self._lock:
            self._stopping = True
        self._commands.put(("stop",))
        self._wake.set()

    def _run(self, until: Optional[Future]) -> bool:
        """Steps; True once stopped, False when until is done and no request is left."""
        while True:
            if self._apply_commands():
                for key in list(self._tracked):
                    self.engine.abort(self._tracked[key].engine_id)
                while self.engine.has_work():
                    self._step()
                if self.heartbeat_s is not None:
                    self.engine.close()
                return True
            if self.engine.has_work():
                self._step()
            elif until is not None and until.done() and not self._tracked and self._commands.empty():
                return False
            elif self._wake.wait(self.heartbeat_s):
                self._wake.clear()
            elif self.heartbeat_s is not None:
                self._step()  # idle: an empty step keeps the other ranks' collectives alive

    def _apply_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return False
            if command[0] == "add":
                _, key, spec, on_output, arrived = command
                engine_id = self.engine.add_spec(spec)
                self._tracked[key] = _Tracked(engine_id, on_output, arrived)
                self._by_engine_id[engine_id] = key
                with self._lock:
                    self._pending -= 1
            elif command[0] == "abort":
                tracked = self._tracked.get(command[1])
                if tracked is not None:
                    self.engine.abort(tracked.engine_id)
            else:
                return True

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 (the engine failed outside a forward: end every request, go on)
            logger.exception("engine step failed")
            outputs = [StepOutput(t.engine_id, [], "", finish_reason="error", error=error) for t in self._tracked.values()]
            for out in outputs:
                self.engine.abort(out.request_id)
        now = time.perf_counter()
        for out in outputs:
            key = self._by_engine_id.get(out.request_id)
            if key is None:
                continue
            tracked = self._tracked[key]
            self._measure(tracked, out, now)
            if out.finished:
                del self._tracked[key], self._by_engine_id[out.request_id]
            try:
                tracked.on_output(out)
            except Exception:  # noqa: BLE001 (a handler's failure must not stop the loop)
                logger.exception("output handler failed")
        m = self.metrics
        m.running.set(self.engine.num_running)
        m.slots_used.set(self.engine.num_running)
        m.waiting.set(self.engine.num_waiting + self._pending)

    def _measure(self, tracked: _Tracked, out: StepOutput, now: float) -> None:
        m = self.metrics
        if out.new_tokens:
            m.generated_tokens.inc(len(out.new_tokens))
            if tracked.last_token is None:
                m.ttft.observe(now - tracked.arrived)
            else:
                m.itl.observe(now - tracked.last_token)
            tracked.last_token = now
        if out.finished:
            if out.completion is not None:
                m.prompt_tokens.inc(out.completion.prompt_tokens)
            m.finished.labels(out.finish_reason).inc()

