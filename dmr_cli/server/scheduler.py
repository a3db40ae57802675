"""The scheduler: which runners are loaded, who is using them, and when they go (spec §7.1).

A runner is keyed by (backend, model ID, draft model ID, mode). Concurrent requests for one
key share a runner by reference count; an idle runner expires after its keep_alive; when
the slots are full, or memory is short, idle runners are evicted least-recently-used first
and only as many as needed. Memory admission (absent from DMR) refuses a model that would
not fit instead of letting the machine swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from dmr_cli import config as settings
from dmr_cli.errors import Conflict, DmrError, ModelNotFound
from dmr_cli.runtime import memory
from dmr_cli.runtime.config import RunnerConfig
from dmr_cli.runtime.detect import Detection, free_memory
from dmr_cli.runtime.flags import format_keep_alive
from dmr_cli.runtime.process import EngineLog, RunnerProcess, wait_healthy
from dmr_cli.server.configs import ConfigKey, ConfigStore
from dmr_cli.server.logs import ENGINE_LOG
from dmr_cli.server.metrics import Metrics
from dmr_cli.server.recorder import Recorder
from dmr_cli.store import Model, Store

log = logging.getLogger("dmr")
PRELOAD_TIMEOUT = 60.0  # DMR gives the preload after a configure one minute

DEFAULT_BACKEND = "llama.cpp"
BACKENDS = ("llama.cpp", "vllm", "mlx", "sglang", "diffusers")
DEFAULT_KEEP_ALIVE = 300.0
READY_TIMEOUT = 300.0
EVICTION_GRACE = 5.0


class RunnerKey(NamedTuple):  # a tuple: built and hashed on every request
    backend: str
    model_id: str
    draft_id: str | None
    mode: str


@dataclass(eq=False)
class Runner:
    key: RunnerKey
    model_ref: str
    socket: Path
    keep_alive: float  # seconds; 0 = unload after each request; negative = never
    memory: int
    embedded: bool
    process: RunnerProcess | None = None
    refcount: int = 0
    loading: bool = True
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    error: DmrError | None = None
    last_used: float = field(default_factory=time.time)  # wall clock, for ps / expires_at
    released: float = 0.0  # event-loop clock of the last release, for the expiry timer
    # Armed at a release when none is; it re-arms itself for the rest of the keep_alive if the
    # runner was used meanwhile, so a request costs no timer of its own.
    expiry: asyncio.TimerHandle | None = None
    # The embedded engine cannot batch: its requests take turns instead of cutting each other off.
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopping: bool = False

    @property
    def idle(self) -> bool:
        return self.refcount == 0 and not self.loading

    def ps(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "backend_name": self.key.backend,
            "model_name": self.model_ref,
            "mode": self.key.mode,
            "last_used": (
                "0001-01-01T00:00:00Z"
                if self.refcount or self.loading
                else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used))
            ),
        }
        if self.refcount:
            item["in_use"] = True
        if self.loading:
            item["loading"] = True
        item["keep_alive"] = format_keep_alive(self.keep_alive)
        return item

    @property
    def expires_at(self) -> float | None:
        if self.refcount or self.loading or self.keep_alive < 0:
            return None
        return self.last_used + self.keep_alive


class Scheduler:
    def __init__(
        self,
        store: Store,
        configs: ConfigStore,
        *,
        detection: Detection,
        metrics: Metrics,
        recorder: Recorder,
    ) -> None:
        self.store = store
        self.configs = configs
        self.detection = detection
        self.metrics = metrics
        self.recorder = recorder
        self.slots = int(settings.env("DMR_SLOTS") or 0) or settings.default_slots()
        # Kept: Python 3.11 asks the kernel for the pid on every `asyncio.get_running_loop()`,
        # and release() runs once a request.
        self._loop = asyncio.get_running_loop()
        self.runners: dict[RunnerKey, Runner] = {}
        self._changed = asyncio.Condition()
        self._waiting = 0  # acquire() calls waiting for a slot
        self._socket_dir = Path(tempfile.mkdtemp(prefix="dmr-runners-"))
        self._socket_seq = 0
        self._engine_log = EngineLog(settings.log_dir() / ENGINE_LOG)
        self._watchers: set[asyncio.Task[None]] = set()
        self._preloads: dict[ConfigKey, asyncio.Task[None]] = {}
        self._terminations: set[asyncio.Future[Any]] = set()
        self._stopping: set[Runner] = set()

    # -- public API -----------------------------------------------------------------------

    async def acquire(
        self, model_ref: str, mode: str, backend: str = DEFAULT_BACKEND, model: Model | None = None
    ) -> Runner:
        if model is None:
            model = self.store.get(model_ref)  # cached index: no I/O on the hot path
        config = self.configs.lookup(backend, model.id, mode) or RunnerConfig()
        draft = self._draft_model(config)
        key = RunnerKey(backend, model.id, draft.id if draft else None, mode)
        while True:
            runner = self.runners.get(key)
            if runner is not None and not runner.stopping:
                runner.refcount += 1
                if not runner.ready.is_set():
                    try:
                        await runner.ready.wait()
                    except BaseException:
                        self.release(runner)
                        raise
                if runner.error is not None:
                    runner.refcount -= 1
                    raise runner.error
                return runner
            async with self._changed:
                # A runner being stopped holds its slot until its process has exited, so its
                # memory is free before the next model loads (spec §7.1).
                if len(self.runners) + len(self._stopping) < self.slots:
                    break
                if not self._stopping:
                    self._evict_lru("slots")
                self._waiting += 1
                try:
                    await self._changed.wait()  # cancellable: a client that gives up stops waiting
                finally:
                    self._waiting -= 1
        return await self._load(key, model, model_ref, config, draft)

    def release(self, runner: Runner) -> None:
        runner.refcount -= 1
        runner.last_used = time.time()
        if runner.refcount > 0 or runner.stopping:
            return
        if runner.keep_alive == 0:
            self._evict(runner, "idle")
        elif runner.keep_alive > 0:
            runner.released = self._loop.time()
            if runner.expiry is None:
                runner.expiry = self._loop.call_later(runner.keep_alive, self._expire, runner)
        self._notify()

    def ps(self) -> list[dict[str, Any]]:
        return [r.ps() for r in self.runners.values()]

    async def unload(self, models: list[str], backend: str = "", unload_all: bool = False) -> int:
        """POST /engines/unload: only idle runners go; in-use runners are never killed."""
        if unload_all:
            self.configs.remove(None)
            doomed = [r for r in self.runners.values() if r.idle]
        else:
            doomed = []
            for ref in models:
                model = await asyncio.to_thread(self.store.find, ref)
                model_id = model.id if model else ref
                self.configs.remove(backend, model_id) if backend else None
                doomed += [
                    r
                    for r in self.runners.values()
                    if r.key.model_id == model_id
                    and r.idle
                    and (not backend or r.key.backend == backend)
                ]
        for runner in doomed:
            self._evict(runner, "unload")
        return len(doomed)

    async def configure(
        self, backend: str, model_ref: str, mode: str, config: RunnerConfig
    ) -> None:
        model = await asyncio.to_thread(self.store.find, model_ref)
        model_id = model.id if model else model_ref
        key = ConfigKey(backend, model_id, mode)
        before = self.configs.get(key)
        if not self.configs.set(key, model_ref, config):
            return
        # A new keep_alive needs no restart (Ollama clients send one with every request).
        same_process = (
            before is not None
            and replace(before, keep_alive=config.keep_alive).to_json() == config.to_json()
        )
        if not same_process:
            await self._cancel_preload(key)  # it would load the old configuration
        for runner in [r for r in self.runners.values() if r.key.model_id == model_id]:
            if runner.key.backend == backend and runner.key.mode == mode:
                if same_process:
                    runner.keep_alive = _keep_alive(config)
                    if runner.expiry is not None:  # armed again with the new one
                        runner.expiry.cancel()
                        runner.expiry = None
                    if runner.idle:  # applied now: 0 unloads, a timer starts over
                        runner.refcount += 1
                        self.release(runner)
                    continue
                if not runner.idle:
                    raise Conflict("runner already active")
                self._evict(runner, "configure")
        if model is not None and config.keep_alive != 0:
            self._preload(key, model_ref)

    async def _cancel_preload(self, key: ConfigKey) -> None:
        """Stop the preload of KEY, if one runs, and undo the load it started: that runner
        is dmr's own doing, not a client's, so a new configuration replaces it instead of
        meeting a busy runner. Not when clients wait on that load too."""
        shared = any(
            ConfigKey(r.key.backend, r.key.model_id, r.key.mode) == key and r.refcount > 1
            for r in self.runners.values()
        )
        task = None if shared else self._preloads.pop(key, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _preload(self, key: ConfigKey, model_ref: str) -> None:
        """Load a just-configured model in the background, as DMR does, so the first
        request finds it ready; a failure shows on that request."""

        async def load() -> None:
            try:
                runner = await asyncio.wait_for(
                    self.acquire(model_ref, key.mode, key.backend), PRELOAD_TIMEOUT
                )
            except (DmrError, TimeoutError) as exc:
                log.info("preloading %s after configure failed: %s", model_ref, exc)
                return
            self.release(runner)

        if key in self._preloads:
            return  # one is loading this configuration already
        task = self._preloads[key] = self._loop.create_task(load())

        def forget(_: object) -> None:
            if self._preloads.get(key) is task:  # not a newer preload of the same key
                del self._preloads[key]

        task.add_done_callback(forget)

    async def shutdown(self) -> None:
        for task in self._preloads.values():
            task.cancel()
        for runner in list(self.runners.values()):
            self._evict(runner)
        await asyncio.gather(*self._terminations, *self._watchers, return_exceptions=True)
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    def warm_up(self) -> None:
        """Find the runner and read its flags before the first request needs them, so a
        cold start costs the runner's own load time and little else. Blocking."""
        from dmr_cli.runtime import install, llamacpp

        with contextlib.suppress(DmrError, OSError):
            binary = install.discover(self.detection)
            if binary.kind == "native" and binary.path is not None:
                llamacpp.flag_support(binary.path)

    # -- loading --------------------------------------------------------------------------

    def _draft_model(self, config: RunnerConfig) -> Model | None:
        if config.speculative is None or not config.speculative.draft_model:
            return None
        try:
            return self.store.get(config.speculative.draft_model)
        except ModelNotFound as exc:
            raise DmrError(f"unable to load runner: draft model: {exc.message}") from exc

    def _context_size(self, model: Model, config: RunnerConfig) -> int:
        for value in (config.context_size, model.config.get("context_size")):
            if isinstance(value, int) and value > 0:
                return value
        arch = model.config.get("architecture") or "llama"
        with contextlib.suppress(ValueError, TypeError):
            return int((model.config.get("gguf") or {}).get(f"{arch}.context_length", 0))
        return 0

    async def _admit(self, model: Model, context_size: int) -> int:
        """Evict idle runners LRU-first until the model fits; refuse when it cannot."""
        need = memory.estimate(model.config.get("gguf") or {}, model.size, context_size)
        while True:
            available = await asyncio.to_thread(self._available_memory)
            if need.total <= available:
                return need.total
            evicted = self._evict_lru("memory")
            if evicted is None:
                raise DmrError(
                    f"unable to load runner: not enough memory for {model_name(model)}: "
                    f"it needs {need.describe()}, {memory.gib(available)} is available",
                    hint="use a smaller context, e.g. dmr configure --context-size 4096 MODEL, "
                    "or unload other models with dmr unload",
                )
            await evicted

    def _available_memory(self) -> int:
        ram, vram = free_memory(self.detection)
        return vram if vram is not None else ram

    async def _load(
        self,
        key: RunnerKey,
        model: Model,
        model_ref: str,
        config: RunnerConfig,
        draft: Model | None,
    ) -> Runner:
        from dmr_cli.runtime import install

        keep_alive = _keep_alive(config)
        self._socket_seq += 1
        runner = Runner(
            key=key,
            model_ref=model_ref,
            socket=self._socket_dir / f"runner-{self._socket_seq}.sock",
            keep_alive=keep_alive,
            memory=0,
            embedded=False,
            refcount=1,
        )
        self.runners[key] = runner
        started = time.monotonic()
        try:
            context_size = self._context_size(model, config)
            runner.memory = await self._admit(model, context_size)
            binary = await asyncio.to_thread(install.discover, self.detection)
            runner.embedded = binary.kind == "embedded"
            argv, env = await asyncio.to_thread(
                self._command, binary, model, draft, key.mode, config, runner.socket
            )
            runner.process = RunnerProcess.spawn(
                argv, env=env, log=self._engine_log, name=f"{binary.variant} runner for {model_ref}"
            )
            self._watch(runner)
            await wait_healthy(runner.process, runner.socket, READY_TIMEOUT)
        except BaseException as exc:
            error = exc if isinstance(exc, DmrError) else self._load_error(runner, exc)
            runner.error = error
            runner.ready.set()
            self._evict(runner)
            runner.refcount = 0
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from exc
        runner.loading = False
        runner.ready.set()
        seconds = time.monotonic() - started
        self.metrics.runner_loaded(key.backend, key.mode, seconds)
        log.info("loaded %s (%s) in %.2f s", model_ref, key.mode, seconds)
        return runner

    def _load_error(self, runner: Runner, exc: BaseException) -> DmrError:
        from dmr_cli.runtime.llamacpp import friendly_error

        detail = str(exc)
        if runner.process is not None and runner.process.poll() is not None:
            detail = friendly_error(runner.process.output_tail()) or detail
        return DmrError(f"unable to load runner: {detail}")

    def _command(
        self,
        binary: Any,
        model: Model,
        draft: Model | None,
        mode: str,
        config: RunnerConfig,
        socket: Path,
    ) -> tuple[list[str], dict[str, str]]:
        from dmr_cli.runtime import llamacpp

        bundle = self.store.bundle(model.id)
        files = bundle_files(bundle)
        draft_path = bundle_files(self.store.bundle(draft.id))["model"] if draft else None
        env = dict(os.environ)
        if binary.kind == "embedded":
            argv = llamacpp.embedded_args(
                model_path=files["model"],
                socket=socket,
                mode=mode,
                config=config,
                model_context_size=model.config.get("context_size"),
                chat_template=files.get("template"),
            )
            return argv, env
        if binary.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(binary.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p
            )
        base = settings.env("LLAMA_ARGS")
        args = llamacpp.build_args(
            model_path=files["model"],
            mode=mode,
            config=config,
            model_context_size=model.config.get("context_size"),
            socket=str(socket),
            chat_template=files.get("template"),
            mmproj=files.get("mmproj"),
            draft_model=draft_path,
            supported=llamacpp.flag_support(binary.path, env=env),
            accelerator=self.detection.accelerator,
            base_args=llamacpp.split_llama_args(base) if base else None,
        )
        return [str(binary.path), *args], env

    # -- eviction -------------------------------------------------------------------------

    def _watch(self, runner: Runner) -> None:
        """A runner that dies is evicted at once; its in-flight requests see their connection
        drop and answer 5xx, and the next request starts a fresh runner."""
        process = runner.process
        assert process is not None

        async def watch() -> None:
            code = await asyncio.to_thread(process.popen.wait)
            if not runner.stopping:
                log.warning("runner for %s exited unexpectedly (status %s)", runner.model_ref, code)
                self._forget(runner, "crashed")

        task = self._loop.create_task(watch())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _expire(self, runner: Runner) -> None:
        runner.expiry = None
        if not runner.idle or runner.keep_alive < 0 or self.runners.get(runner.key) is not runner:
            return  # in use (its release arms a timer again), kept forever, or gone
        loop = self._loop
        left = runner.released + runner.keep_alive - loop.time()
        if left > 0:  # used since this timer was armed
            runner.expiry = loop.call_later(left, self._expire, runner)
        else:
            self._evict(runner, "idle")

    def _evict_lru(self, reason: str) -> asyncio.Future[Any] | None:
        """Evict the least recently used idle runner; its exit, or None if all are busy."""
        idle = [r for r in self.runners.values() if r.idle]
        if not idle:
            return None
        return self._evict(min(idle, key=lambda r: r.last_used), reason)

    def _forget(self, runner: Runner, reason: str | None = None) -> None:
        """REASON (metrics.EVICTION_REASONS) counts the eviction; None (shutdown, a failed
        load) does not."""
        runner.stopping = True
        if runner.expiry:
            runner.expiry.cancel()
        if self.runners.get(runner.key) is runner:
            del self.runners[runner.key]
        if reason is not None:
            self.metrics.runner_evicted(reason)
        model_id = runner.key.model_id
        if not any(r.key.model_id == model_id for r in self.runners.values()):
            self.recorder.forget(model_id)  # spec §9.2: the log goes with the model's runners
        self._notify()

    def _evict(self, runner: Runner, reason: str | None = None) -> asyncio.Future[Any]:
        """Forget the runner at once and stop its process (SIGINT, then SIGKILL)."""
        self._forget(runner, reason)
        loop = self._loop
        if runner.process is None:
            done: asyncio.Future[Any] = loop.create_future()
            done.set_result(None)
        else:
            done = loop.run_in_executor(None, runner.process.terminate, EVICTION_GRACE)
            self._stopping.add(runner)
            self._terminations.add(done)
            done.add_done_callback(self._terminations.discard)

        def stopped(_: asyncio.Future[Any]) -> None:
            self._stopping.discard(runner)
            runner.socket.unlink(missing_ok=True)
            self._notify()

        done.add_done_callback(stopped)
        return done

    def _notify(self) -> None:
        if not self._waiting:
            return  # nobody waits for a slot: spare the hot path a task

        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        self._loop.create_task(notify())


def _keep_alive(config: RunnerConfig) -> float:
    return config.keep_alive if config.keep_alive is not None else DEFAULT_KEEP_ALIVE


def model_name(model: Model) -> str:
    return model.tags[0] if model.tags else model.id


def bundle_files(bundle: Path) -> dict[str, Path]:
    """The files a runner is started with, found in a model bundle (spec §4.3, §5)."""
    model_dir = bundle / "model"
    ggufs = sorted(model_dir.glob("*.gguf"))
    if not ggufs:
        raise DmrError(f"unable to load runner: the model bundle {bundle} has no GGUF file")
    files = {"model": ggufs[0]}
    for name, filename in (("template", "template.jinja"), ("mmproj", "model.mmproj")):
        if (model_dir / filename).exists():
            files[name] = model_dir / filename
    return files
