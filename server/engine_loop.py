"""One thread builds the engine and drives LLMEngine.step(); HTTP handlers talk to it through a command queue and
per-request asyncio queues, so the engine is only ever touched from that thread."""
import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from engine.distributed import RankFailure
from engine.llm_engine import LLMEngine
from engine.outputs import RequestError, RequestOutput
from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.metrics import Metrics

log = logging.getLogger("server")
KEEP_ALIVE_S = 1.0  # an idle tensor-parallel engine asks its ranks to answer this often


class EngineFailure(Exception):
    """The engine raised while stepping; every request in flight fails with it: 500, or 503 when a tensor-parallel
    rank failed (the server is going away)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


@dataclass
class Tracked:
    queue: asyncio.Queue
    admitted: asyncio.Future  # None once the engine took the request, or the APIError saying why it did not
    arrival: float
    last_output: float = 0.0


@dataclass
class Admission:
    """A submitted request as its handler sees it: await admitted (raises the engine's refusal as an APIError) before
    reading outputs; release() runs once however the response ends."""
    request_id: str
    outputs: asyncio.Queue
    admitted: asyncio.Future
    engine_loop: "EngineLoop"
    released: bool = False

    def release(self, finished: bool):
        if not self.released:
            self.released = True
            self.engine_loop.release(self.request_id, finished)


class EngineLoop:
    """make_engine runs on the loop thread, so every torch op of the server runs on that one thread: OpenMP keeps a
    worker pool per thread that opens parallel regions, and a second pool on a machine with few cores makes every
    region of a step wait for its workers to wake (docs/benchmarks.md measured what that costs)."""

    def __init__(self, make_engine: Callable[[], LLMEngine], metrics: Metrics, max_waiting: int):
        self.metrics = metrics
        self.num_in_flight = 0                  # event-loop side: admitted and not yet released
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.tracked: dict[str, Tracked] = {}   # loop-thread side
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: LLMEngine | None = None     # set by the loop thread before it reports back
        self.fatal = ""                          # why the engine cannot go on (a tensor-parallel rank failed)
        self.on_fatal: Callable[[str], None] = lambda message: None  # the server's way to exit then
        built: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, args=(make_engine, built), name="engine-loop", daemon=True)
        self.thread.start()
        failure = built.get()
        if failure is not None:
            self.thread.join()
            raise failure
        self.capacity = self.engine.config.max_num_seqs + max_waiting

    def start(self):
        """Outputs go to the running event loop from now on (no request can arrive before it runs)."""
        self.loop = asyncio.get_running_loop()

    def stop(self):
        self.commands.put(("stop",))
        self.thread.join()

    # ---- event-loop side ----
    def submit(self, token_ids: list[int], params: SamplingParams) -> Admission:
        if self.num_in_flight >= self.capacity:
            raise APIError(503, f"the server is at capacity ({self.capacity} requests in flight); retry later",
                           headers={"Retry-After": "1"})
        if self.fatal:
            raise APIError(503, f"the engine failed: {self.fatal}")
        if not self.thread.is_alive():
            raise APIError(503, "the engine is shutting down", headers={"Retry-After": "1"})
        request_id, outputs, admitted = uuid.uuid4().hex, asyncio.Queue(), asyncio.get_running_loop().create_future()
        self.num_in_flight += 1
        self.commands.put(("add", request_id, token_ids, params, Tracked(outputs, admitted, time.monotonic())))
        return Admission(request_id, outputs, admitted, self)

    async def reload_calibration(self) -> int:
        """Have the engine thread read the draft's sts.json again; its new version, or an APIError saying why not."""
        done = asyncio.get_running_loop().create_future()
        self.commands.put(("reload", done))
        return await done

    def request_reload(self):
        """From a signal handler (SIGHUP): reload on the engine thread, the outcome only logged."""
        self.commands.put(("reload", None))

    def release(self, request_id: str, finished: bool):
        """Called once per submitted request when its handler is done; unfinished ones are aborted (KV freed)."""
        self.num_in_flight -= 1
        if not finished:
            self.commands.put(("abort", request_id))

    # ---- loop-thread side ----
    def run(self, make_engine: Callable[[], LLMEngine], built: queue.SimpleQueue):
        try:
            self.engine = make_engine()
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            built.put(e)
            return
        built.put(None)
        self.serve()

    def serve(self):
        while not self.fatal:
            idle = not self.engine.has_unfinished()
            if not self.apply_commands(block=idle):
                break
            if self.engine.has_unfinished():
                self.step()
            self.metrics.sync(self.engine.stats())
        self.refuse_queued_adds()
        unfinished = list(self.tracked)
        for request_id in unfinished:
            outputs = self.tracked[request_id].queue
            self.abort(request_id)
            self.post(outputs, EngineFailure("the server is shutting down", 503))
        log.info("engine loop stopped (%d unfinished requests aborted)", len(unfinished))
        self.engine.close()  # tensor parallel: the other ranks stop too

    def apply_commands(self, block: bool) -> bool:
        """Apply queued adds and aborts; False when asked to stop. An idle tensor-parallel engine checks its ranks
        every KEEP_ALIVE_S while it waits, so a failed rank is noticed without a request."""
        timeout = KEEP_ALIVE_S if block and self.engine.parallel else None
        while True:
            try:
                command = self.commands.get(block=block, timeout=timeout)
            except queue.Empty:
                if block:
                    self.keep_alive()
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "add":
                self.add(*command[1:])
            elif command[0] == "reload":
                self.reload(command[1])
            else:
                self.abort(command[1])

    def reload(self, done: asyncio.Future | None):
        try:
            version = self.engine.reload_calibration()
        except (ValueError, OSError) as e:
            log.error("calibration reload failed: %s", e)
            if done is not None:
                self.settle(done, APIError(409, str(e)))
            return
        log.info("calibration reloaded: version %d", version)
        if done is not None:
            self.settle(done, version)

    def refuse_queued_adds(self):
        """Requests submitted after the stop command get a 503 instead of waiting for an engine that has stopped."""
        while True:
            try:
                command = self.commands.get(block=False)
            except queue.Empty:
                return
            if command[0] == "add":
                reason = f"the engine failed: {self.fatal}" if self.fatal else "the server is shutting down"
                self.settle(command[-1].admitted, APIError(503, reason))

    def add(self, request_id: str, token_ids: list[int], params: SamplingParams, tracked: Tracked):
        try:
            self.engine.add_request(token_ids, params, request_id)
        except RequestError as e:
            return self.settle(tracked.admitted, APIError(400, str(e), e.field))
        except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
            log.exception("the engine could not take a request")
            return self.settle(tracked.admitted, APIError(500, f"{type(e).__name__}: {e}"))
        self.tracked[request_id] = tracked
        self.settle(tracked.admitted, None)

    def abort(self, request_id: str, reason: str = "abort"):
        if self.tracked.pop(request_id, None) is not None:
            self.engine.abort(request_id)
            self.metrics.finished(reason)

    def keep_alive(self):
        try:
            self.engine.keep_alive()
        except RankFailure as e:
            self.fail(e)

    def fail(self, failure: RankFailure):
        """A rank failed: every request in flight and every later one gets a 503, and the server exits."""
        self.fatal = str(failure)
        log.error("%s; the server stops", failure)
        for request_id in list(self.tracked):
            outputs = self.tracked[request_id].queue
            self.abort(request_id, "error")
            self.post(outputs, EngineFailure(f"the engine failed: {failure}", 503))
        self.on_fatal(self.fatal)

    def step(self):
        try:
            outputs = self.engine.step()
        except RankFailure as e:
            return self.fail(e)
        except Exception as e:
            log.exception("engine step failed; failing the %d requests in flight", len(self.tracked))
            failure = EngineFailure(f"the engine failed: {type(e).__name__}: {e}")
            for request_id in list(self.tracked):
                outputs = self.tracked[request_id].queue
                self.abort(request_id, "error")
                self.post(outputs, failure)
            return
        self.deliver([(out.request_id, out) for out in outputs], time.monotonic())

    def deliver(self, items: list[tuple[str, RequestOutput]], now: float):
        batch = []
        for request_id, out in items:
            tracked = self.tracked.get(request_id)
            if tracked is None:
                continue
            self.observe(tracked, out, now)
            if out.finished:
                del self.tracked[request_id]
            batch.append((tracked.queue, out))
        if batch:
            self.loop.call_soon_threadsafe(put_all, batch)

    def post(self, outputs: asyncio.Queue, item):
        self.loop.call_soon_threadsafe(put_all, [(outputs, item)])

    def settle(self, done: asyncio.Future, value):
        """Answer a handler's future from the engine thread (an APIError refuses)."""
        self.loop.call_soon_threadsafe(settle, done, value)

    def observe(self, tracked: Tracked, out: RequestOutput, now: float):
        m = self.metrics
        if not tracked.last_output:
            m.prompt_tokens.inc(out.num_prompt_tokens)
            m.ttft.observe(now - tracked.arrival)
        else:
            m.itl.observe(now - tracked.last_output)
        tracked.last_output = now
        m.generation_tokens.inc(len(out.delta_token_ids))
        if out.finished:
            m.e2e.observe(now - tracked.arrival)
            m.finished(out.finish_reason)
            if self.engine.speculative:
                m.verify_budget.observe(out.num_verified_tokens)


def settle(done: asyncio.Future, value):
    """An exception value is raised to the awaiting handler, anything else returned; nothing once the handler stopped
    waiting (its client left)."""
    if done.done():
        return
    if isinstance(value, BaseException):
        done.set_exception(value)
    else:
        done.set_result(value)


def put_all(batch: list[tuple[asyncio.Queue, object]]):
    for outputs, item in batch:
        outputs.put_nowait(item)
