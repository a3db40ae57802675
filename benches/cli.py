"""CLI start-up cost: `dmr ls --json` and `dmr status --json` against a running daemon.

Prints each command's median wall time as a ratio to `python -c 'import typer'` measured in
the same run, interleaved, so machine noise hits both alike. Goal: ratio <= 1.3.

    .venv/bin/python benches/cli.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.daemon import start_daemon
from tests.helpers.oci import hand_artifact


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    dmr = str(Path(sys.executable).parent / "dmr")
    with tempfile.TemporaryDirectory() as tmp:
        daemon = start_daemon(Path(tmp) / "home")
        try:
            from dmr_cli.store import Store

            store = Store(daemon.models_path)
            for i in range(5):
                art = hand_artifact([os.urandom(64)])
                store.write_blob_bytes(art.config)
                store.write_blob_bytes(art.layers[0])
                store.write_model(art.manifest, [f"ai/bench{i}"])
            commands = {
                "baseline: python -c 'import typer'": [sys.executable, "-c", "import typer"],
                "dmr ls --json": [dmr, "ls", "--json"],
                "dmr status --json": [dmr, "status", "--json"],
            }
            times: dict[str, list[float]] = {name: [] for name in commands}
            for cmd in commands.values():  # warm the page cache
                wall(cmd, daemon.env)
            for _ in range(args.runs):
                for name, cmd in commands.items():
                    times[name].append(wall(cmd, daemon.env))
        finally:
            daemon.stop()
    base = statistics.median(times["baseline: python -c 'import typer'"])
    print(f"{'command':38} {'median ms':>10} {'ratio':>7}")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"{name:38} {med * 1000:10.1f} {med / base:7.2f}")
    print("goal: dmr commands at most 1.30x the baseline")


if __name__ == "__main__":
    main()
