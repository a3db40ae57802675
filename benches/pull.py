"""Pull throughput: dmr's parallel ranged download against `curl` fetching the same blobs
one after another, measured in the same run on a model of at least 500 MB.

Two links are measured, both served by Debian's docker-registry on 127.0.0.1:
  loopback  the registry directly (CPU-bound on a small machine: hashing and copying cost
            as much as the transfer),
  capped    through a relay that limits each TCP connection (as a CDN or a busy registry
            limits each stream), where parallel connections are what makes a pull fast.
It also reports the tail: how long the last 1 % of bytes took against the mean 1 %.

    .venv/bin/python benches/pull.py [--size-mb 600] [--connection-mbps 100] [--runs 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmr_cli.distribution.pull import pull
from dmr_cli.store import Store
from tests.helpers.gguf_factory import make_large_gguf
from tests.helpers.oci import digest_of, hand_artifact, push_hand_artifact
from tests.helpers.proxy import CountingProxy
from tests.helpers.registry import start_registry

MB = 1_000_000


def curl_sequential(host: str, repo: str, digests: list[str], out: Path) -> float:
    start = time.perf_counter()
    for digest in digests:
        subprocess.run(
            ["curl", "-sf", "-o", str(out), f"http://{host}/v2/{repo}/blobs/{digest}"],
            check=True,
        )
    return time.perf_counter() - start


def dmr_pull(host: str, repo: str, root: Path) -> float:
    """Wall time of a pull into a fresh store."""
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    pull(Store(root), f"{host}/{repo}", progress=lambda event: None)
    return time.perf_counter() - start


def tail_ratio(marks: list[tuple[float, int]]) -> float:
    """Time the last 1 % of bytes took on the wire, over the mean time per 1 %."""
    start, end, total = marks[0][0], marks[-1][0], marks[-1][1]
    before_tail = max(t for t, sent in marks if sent <= total * 0.99)
    return (end - before_tail) / ((end - start) / 100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=600)
    parser.add_argument("--connection-mbps", type=float, default=100.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registry = start_registry(tmp)
        proxy = None
        try:
            weights = make_large_gguf(tmp / "model.gguf", args.size_mb * MB).read_bytes()
            art = hand_artifact([weights])
            push_hand_artifact(registry.url, "ai/bench", "latest", art)
            digests = [digest_of(b) for b in art.layers]
            host, port = registry.host.split(":")
            proxy = CountingProxy(host, int(port), connection_rate=args.connection_mbps * MB)
            print(f"model: {len(weights) / MB:.0f} MB, {args.runs} runs each, median shown")
            print(
                f"{'link':10} {'curl s':>8} {'dmr s':>8} {'dmr MB/s':>9} {'ratio':>6} {'tail':>6}"
            )
            for name, target in (("loopback", registry.host), ("capped", proxy.host)):
                curls, dmrs, tails = [], [], []
                for _ in range(args.runs):
                    curls.append(curl_sequential(target, "ai/bench", digests, tmp / "curl.out"))
                    proxy.marks.clear()
                    dmrs.append(dmr_pull(target, "ai/bench", tmp / "store"))
                    if name == "capped":
                        tails.append(tail_ratio(proxy.marks))
                c, d = statistics.median(curls), statistics.median(dmrs)
                rate = len(weights) / MB / d
                tail = f"{statistics.median(tails):6.2f}" if tails else "   n/a"
                print(f"{name:10} {c:8.2f} {d:8.2f} {rate:9.0f} {c / d:6.2f} {tail}")
            print(
                "ratio = curl time / dmr time (goal >= 1.5); tail = last 1 % of bytes on the "
                "wire / mean 1 %, median run (goal <= 2; measured at the relay, so capped only)"
            )
            print(f"capped link: {args.connection_mbps:.0f} MB/s per TCP connection")
        finally:
            if proxy:
                proxy.close()
            registry.stop()


if __name__ == "__main__":
    main()
