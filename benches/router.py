"""dmr's own cost as a router, against a runner that answers at once (benches/mock_runner.py).

benches/inference.py measures dmr in front of a real llama-server; on two cores the runner's
compute and the router share the CPU, so its overhead figures move by ±0.2 ms from run to
run. Here the runner does nothing, so what remains is the router: the added latency of dmr and
of benches/plain_relay.py against the runner addressed directly (interleaved, same run), and
the CPU time each router process spends per request and per streamed answer (64 events).

    .venv/bin/python benches/router.py [--runs 3000] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.inference import (
    chat,
    cpu_seconds,
    exchange,
    overhead,
    plain_relay,
    runner_sockets,
    serving,
)
from tests.helpers.daemon import isolated_env
from tests.helpers.gguf_factory import make_tiny_llama

HERE = Path(__file__).resolve().parent


async def cpu_per_request(pid: int, sock: str, runs: int, stream: bool = False) -> float:
    """Seconds of CPU process PID spends per sequential request sent to SOCK."""
    before = cpu_seconds(pid)
    for _ in range(runs):
        await exchange(sock, chat("ai/tiny", 1, stream=stream))
    return (cpu_seconds(pid) - before) / runs


async def streaming(paths: dict[str, str], runs: int) -> None:
    ttft: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):
        for name, sock in paths.items():
            first, _, _ = await exchange(sock, chat("ai/tiny", 64, stream=True))
            ttft[name].append(first)
    direct = statistics.median(ttft["direct"])
    print(f"streaming ({runs} each): time to first event direct {direct * 1e3:.3f} ms")
    for name in list(paths)[1:]:
        added = statistics.median(ttft[name]) - direct
        print(f"  {name}: added {added * 1e3:+.3f} ms (goal <= 0.3)")


async def run_all(sock: str, pid: int, args: argparse.Namespace) -> None:
    await exchange(sock, chat("ai/tiny", 1))
    (runner,) = runner_sockets(pid)
    with tempfile.TemporaryDirectory(prefix="dmr-plain-") as tmp:
        relay = plain_relay(f"{tmp}/relay.sock", runner)
        try:
            while not os.path.exists(f"{tmp}/relay.sock"):
                await asyncio.sleep(0.01)
            paths = {"direct": runner, "plain relay": f"{tmp}/relay.sock", "dmr": sock}
            routers = {"plain relay": relay.pid, "dmr": pid}
            await overhead(paths, args.runs, routers)
            await streaming(paths, max(20, args.runs // 30))
            for stream, runs, unit in ((False, args.runs // 3, "request"), (True, 20, "stream")):
                cpu: dict[str, list[float]] = {name: [] for name in routers}
                for _ in range(3):
                    for name, router in routers.items():
                        cpu[name].append(
                            await cpu_per_request(router, paths[name], runs, stream=stream)
                        )
                plain, dmr = (statistics.median(cpu[n]) for n in routers)
                print(
                    f"CPU per {unit} (median of 3 x {runs}): plain relay {plain * 1e6:.0f} us, "
                    f"dmr {dmr * 1e6:.0f} us ({dmr / plain:.2f}x)"
                )
        finally:
            relay.terminate()
            relay.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument(
        "--llama-server",
        default=str(Path.home() / ".cache/dmr-test/runners/cpu/bin/llama-server"),
        help="the real llama-server, whose --help the mock repeats (dmr adapts its flags to it)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmr-router-") as tmp_name:
        tmp = Path(tmp_name)
        help_file = tmp / "help.txt"
        help_file.write_bytes(
            subprocess.run([args.llama_server, "--help"], capture_output=True).stdout
        )
        mock = tmp / "llama-server"
        mock.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "mock_runner.py"}" "$@"\n')
        mock.chmod(0o755)
        env = isolated_env(tmp / "home", LLAMA_SERVER_PATH=str(mock), DMR_NO_AUTO_START="1")
        env["DMR_MOCK_HELP"] = str(help_file)
        sock = str(tmp / "dmr.sock")
        gguf = make_tiny_llama(tmp / "tiny.gguf")
        with serving(env, sock, {"ai/tiny": gguf}) as pid:
            asyncio.run(run_all(sock, pid, args))


if __name__ == "__main__":
    main()
