"""Inference through `dmr serve` against the same llama-server addressed directly.

Every figure is a ratio or a difference to the direct path measured in the same run, with the
two interleaved so machine noise hits both alike. Both paths use the same minimal HTTP client
over a Unix socket (dmr serve --socket), so only dmr's own cost differs.

  overhead     p50/p99 of a 1-token chat completion, sequential and with 32 in flight (tiny model)
               (dmr and benches/plain_relay.py, a bare byte relay, both against the direct path)
  streaming    time to first token, mean gap between tokens, tokens/s of a 256-token stream
  concurrency  TTFT of a stream joining 3 in flight and of 4 sent at once vs 1 (cold prompts),
               aggregate tokens/s of the 4 vs 1
  prompt cache first token of a repeated ~2k-token prompt vs a cold 50-token prompt
  cold start   dmr's first token on an unloaded model minus llama-server's own start time

    .venv/bin/python benches/inference.py [--runs 300] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.daemon import isolated_env
from tests.helpers.gguf_factory import make_tiny_llama

NO_STOP = {"2": -100, "260": -100}  # ban the generated vocabulary's end tokens
PARTS = ("overhead", "streaming", "concurrency", "cache", "cold")


async def exchange(
    sock: str, body: dict[str, object], first: asyncio.Event | None = None
) -> tuple[float, list[float], bytes]:
    """POST /v1/chat/completions; returns (time to first body byte, arrival time of each
    SSE event or of the body, raw body). FIRST is set when the first body byte arrives."""
    data = json.dumps(body).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_unix_connection(sock, limit=1 << 22)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"{head!r} {await reader.read(2000)!r}")
    arrivals: list[float] = []
    chunks = []
    while chunk := await reader.read(65536):
        now = time.perf_counter() - start
        if first is not None:
            first.set()
        arrivals += [now] * max(1, chunk.count(b"data: "))
        chunks.append(chunk)
    writer.close()
    return arrivals[0], arrivals, b"".join(chunks)


def chat(model: str, tokens: int, prompt: str = "hello", stream: bool = False) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "stream": stream,
        "logit_bias": NO_STOP,
        "temperature": 0,
    }


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def runner_sockets(daemon_pid: int) -> set[str]:
    out = set()
    for child in psutil.Process(daemon_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:  # exiting
            continue
        if "--host" in cmd:
            out.add(cmd[cmd.index("--host") + 1])
    return out


async def overhead(paths: dict[str, str], runs: int, routers: dict[str, int]) -> None:
    """PATHS: name → socket, "direct" first; each request goes to all of them in turn.
    ROUTERS: name → pid of the process behind that path, whose CPU time is measured."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, sock in paths.items():
            start = time.perf_counter()
            await exchange(sock, chat("ai/tiny", 1))
            times[name].append(time.perf_counter() - start)
    d50, d99 = pct(times["direct"], 0.5), pct(times["direct"], 0.99)
    print(
        f"overhead, sequential ({runs} each): direct p50 {d50 * 1e3:.3f} ms p99 {d99 * 1e3:.3f} ms"
    )
    for name in list(paths)[1:]:
        m50, m99 = pct(times[name], 0.5), pct(times[name], 0.99)
        print(
            f"  {name}: added p50 {(m50 - d50) * 1e3:+.3f} ms (goal <= 0.2), "
            f"p99 {(m99 - d99) * 1e3:+.3f} ms (goal <= 0.5)"
        )
    in_flight: dict[str, list[float]] = {name: [] for name in paths}
    cpu = dict.fromkeys(routers, 0.0)

    async def worker(sock: str, out: list[float], n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await exchange(sock, chat("ai/tiny", 1))
            out.append(time.perf_counter() - start)

    # Many short interleaved rounds: the tail of one round moves by several ms with the
    # machine, and so would a difference between two long runs.
    per_worker = max(4, runs // 100)
    for _ in range(8):
        for name, sock in paths.items():
            before = cpu_seconds(routers[name]) if name in routers else 0.0
            await asyncio.gather(*(worker(sock, in_flight[name], per_worker) for _ in range(32)))
            if name in routers:
                cpu[name] += cpu_seconds(routers[name]) - before
    d50, d99 = pct(in_flight["direct"], 0.5), pct(in_flight["direct"], 0.99)
    print(f"  32 in flight: direct p50 {d50 * 1e3:.2f} ms p99 {d99 * 1e3:.2f} ms")
    for name in list(paths)[1:]:
        m50, m99 = pct(in_flight[name], 0.5), pct(in_flight[name], 0.99)
        line = (
            f"  {name}: added p50 {(m50 - d50) * 1e3:+.2f} ms, "
            f"p99 {(m99 - d99) * 1e3:+.2f} ms (goal <= 1)"
        )
        if name in routers:
            # The router's CPU competes with the runner's on two cores, and under load it is
            # well above its cost per request on an idle machine (benches/router.py).
            line += f"; its CPU {cpu[name] / len(in_flight[name]) * 1e6:.0f} us a request"
        print(line)


def cpu_seconds(pid: int) -> float:
    """CPU time of PID's threads, to the nanosecond (psutil counts 10 ms clock ticks)."""
    tasks = Path(f"/proc/{pid}/task").glob("*/schedstat")
    return sum(int(task.read_text().split()[0]) for task in tasks) / 1e9


async def streaming(paths: dict[str, str], runs: int) -> None:
    stats: dict[str, dict[str, list[float]]] = {
        n: {"ttft": [], "gap": [], "tps": []} for n in paths
    }
    for _ in range(runs):
        for name, sock in paths.items():
            ttft, arrivals, _ = await exchange(sock, chat("ai/smol", 256, stream=True))
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            stats[name]["ttft"].append(ttft)
            stats[name]["gap"].append(statistics.mean(gaps))
            stats[name]["tps"].append(256 / (arrivals[-1] - ttft))
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in stats.items()}
    direct = med["direct"]
    print(
        f"streaming ({runs} x 256 tokens, SmolLM2-135M shapes): TTFT direct "
        f"{direct['ttft'] * 1e3:.2f} ms, mean gap {direct['gap'] * 1e3:.3f} ms"
    )
    for name in list(paths)[1:]:
        other = med[name]
        print(
            f"  {name}: TTFT added {(other['ttft'] - direct['ttft']) * 1e3:+.3f} ms (goal <= 0.3),"
            f" mean gap {other['gap'] * 1e3:.3f} ms, tokens/s ratio "
            f"{other['tps'] / direct['tps']:.4f} (goal >= 0.995)"
        )


async def concurrency(dmr: str, direct: str) -> None:
    """Every prompt is new to the runner, so no stream is helped by the prompt cache: the
    single stream is measured as cold as the four. Two shapes of "4 streams in flight": a
    stream that joins three already streaming (the steady state of a shared runner), and four
    sent at the same instant (a burst, whose four prompts are evaluated in one batch)."""
    fresh = itertools.count()

    async def one(sock: str, first: asyncio.Event | None = None) -> tuple[float, float]:
        prompt = f"{next(fresh)} tell me a story"
        ttft, arrivals, _ = await exchange(sock, chat("ai/smol", 128, prompt, True), first)
        return ttft, arrivals[-1]

    async def joining(sock: str) -> float:
        firsts = [asyncio.Event() for _ in range(3)]
        running = [asyncio.create_task(one(sock, f)) for f in firsts]
        for first in firsts:
            await first.wait()
        ttft, _ = await one(sock)
        await asyncio.gather(*running)
        return ttft

    paths = {"direct": direct, "dmr": dmr}
    runs: dict[str, dict[str, list[float]]] = {
        n: {"ttft": [], "tps": [], "joined": [], "worst": [], "aggregate": []} for n in paths
    }
    for _ in range(3):  # interleaved, so that the machine's moods hit both paths alike
        for name, sock in paths.items():
            ttft, total = await one(sock)
            runs[name]["ttft"].append(ttft)
            runs[name]["tps"].append(128 / total)
            runs[name]["joined"].append(await joining(sock))
            start = time.perf_counter()
            burst = await asyncio.gather(*(one(sock) for _ in range(4)))
            runs[name]["aggregate"].append(4 * 128 / (time.perf_counter() - start))
            runs[name]["worst"].append(max(t for t, _ in burst))
    for name, measured in runs.items():
        med = {k: statistics.median(v) for k, v in measured.items()}
        single = med["ttft"]
        print(
            f"concurrency, {name} (native runner; single stream TTFT {single * 1e3:.1f} ms):"
            f" TTFT of a stream joining 3 in flight / single {med['joined'] / single:.2f}"
            f" (goal <= 1.5); 4 sent at once: worst TTFT / single {med['worst'] / single:.2f},"
            f" aggregate tokens/s / single {med['aggregate'] / med['tps']:.2f} (goal >= 1.2)"
        )


async def prompt_cache(dmr: str) -> None:
    long_prompt = " ".join(["hello world the model is a tiny test"] * 55)  # ~2k tokens
    cold = [
        (await exchange(dmr, chat("ai/smol", 1, prompt=f"{i} hello"[:50])))[0] for i in range(5)
    ]
    await exchange(dmr, chat("ai/smol", 1, prompt=long_prompt))  # fills the cache
    warm = [(await exchange(dmr, chat("ai/smol", 1, prompt=long_prompt)))[0] for _ in range(5)]
    ratio = statistics.median(warm) / statistics.median(cold)
    print(
        f"prompt cache: repeated ~2k-token prompt first token / cold 50-token prompt "
        f"{ratio:.2f} (goal <= 1.5)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--stream-runs", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=7)
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma list of parts to run, of {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--llama-server",
        default=str(Path.home() / ".cache/dmr-test/runners/cpu/bin/llama-server"),
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmr-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = isolated_env(tmp / "home", LLAMA_SERVER_PATH=args.llama_server, DMR_NO_AUTO_START="1")
        sock = str(tmp / "dmr.sock")
        tiny = make_tiny_llama(tmp / "tiny.gguf")
        smol = make_tiny_llama(
            tmp / "smol.gguf",
            n_embd=576,
            n_layer=30,
            n_head=9,
            n_head_kv=3,
            n_ff=1536,
            context_length=4096,
            ftype="F16",
        )
        with serving(env, sock, {"ai/tiny": tiny, "ai/smol": smol}) as pid:
            asyncio.run(run_all(sock, pid, args))


@contextlib.contextmanager
def serving(env: dict[str, str], sock: str, models: dict[str, Path]) -> Iterator[int]:
    """`dmr serve` on SOCK with MODELS (tag → GGUF) packaged; yields the daemon's pid."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dmr_cli", "serve", "--socket", sock],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not os.path.exists(sock):
            time.sleep(0.05)
        for tag, path in models.items():
            subprocess.run(
                [sys.executable, "-m", "dmr_cli", "package", "--gguf", str(path), tag],
                env={**env, "MODEL_RUNNER_HOST": f"unix://{sock}"},
                check=True,
                capture_output=True,
            )
        yield daemon.pid
    finally:
        daemon.terminate()
        daemon.wait()


async def run_all(sock: str, pid: int, args: argparse.Namespace) -> None:
    await exchange(sock, chat("ai/tiny", 1))
    (direct_tiny,) = runner_sockets(pid)
    await exchange(sock, chat("ai/smol", 1))
    (direct_smol,) = runner_sockets(pid) - {direct_tiny}
    parts = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="dmr-plain-") as tmp:
        relays = [
            plain_relay(f"{tmp}/{n}.sock", r) for n, r in (("t", direct_tiny), ("s", direct_smol))
        ]
        try:
            for relay in relays:
                while not os.path.exists(relay.args[-2]):
                    await asyncio.sleep(0.01)
            if "overhead" in parts:
                paths = {"direct": direct_tiny, "plain relay": relays[0].args[-2], "dmr": sock}
                await overhead(paths, args.runs, {"plain relay": relays[0].pid, "dmr": pid})
            if "streaming" in parts:
                paths = {"direct": direct_smol, "plain relay": relays[1].args[-2], "dmr": sock}
                await streaming(paths, args.stream_runs)
        finally:
            for relay in relays:
                relay.terminate()
                relay.wait()
    if "concurrency" in parts:
        await concurrency(sock, direct_smol)
    if "cache" in parts:
        await prompt_cache(sock)
    if "cold" in parts:
        await cold_start(sock, pid, direct_tiny, args.cold_runs)


def plain_relay(listen: str, runner: str) -> subprocess.Popen[bytes]:
    """benches/plain_relay.py in front of RUNNER: what any relay process costs here."""
    script = Path(__file__).resolve().parent / "plain_relay.py"
    return subprocess.Popen([sys.executable, str(script), listen, runner])


async def cold_start(dmr: str, pid: int, tiny_socket: str, runs: int) -> None:
    """dmr's first token on an unloaded model against llama-server's own: the same argv
    dmr used (read from the runner process), started here, polled for health every 2 ms."""
    (argv,) = [
        c.cmdline()
        for c in psutil.Process(pid).children(recursive=True)
        if tiny_socket in c.cmdline()
    ]
    through_dmr, alone = [], []
    for _ in range(runs):
        before = runner_sockets(pid)
        await post(dmr, "/engines/unload", {"models": ["ai/tiny"]})
        while len(runner_sockets(pid)) == len(before):
            await asyncio.sleep(0.01)
        start = time.perf_counter()
        await exchange(dmr, chat("ai/tiny", 1))
        through_dmr.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory(prefix="dmr-cold-") as tmp:
            sock = f"{tmp}/r.sock"
            own = [*argv]
            own[own.index("--host") + 1] = sock
            start = time.perf_counter()
            proc = subprocess.Popen(own, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while True:
                    try:
                        status = await get_status(sock, "/health")
                        if status == 200:
                            break
                    except OSError:
                        pass
                    await asyncio.sleep(0.002)
                await exchange(sock, chat("x", 1))
                alone.append(time.perf_counter() - start)
            finally:
                proc.terminate()
                proc.wait()
    d, a = statistics.median(through_dmr), statistics.median(alone)
    print(
        f"cold start ({runs} each, medians): dmr first token {d * 1e3:.1f} ms, llama-server alone "
        f"{a * 1e3:.1f} ms, added {(d - a) * 1e3:+.1f} ms (goal <= 20)"
    )


async def get_status(sock: str, path: str) -> int:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


async def post(sock: str, path: str, body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    answer = await reader.read()
    writer.close()
    return answer


if __name__ == "__main__":
    main()
