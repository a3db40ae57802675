"""A stand-in for llama-server that answers at once, so benches/router.py measures the
router alone: on this machine a real runner's compute competes with the router for the same
two cores, which hides a difference of 0.1 ms in noise. performance.md §1.4 measured the
reference relays the same way.

Called as dmr calls llama-server: `--version` and `--help` print what the real binary printed
(DMR_MOCK_HELP names a file holding its `--help`), anything else serves on `--host SOCKET`.
GET /health is 200; POST answers every path with a fixed chat completion, or, when the body
asks for `"stream": true`, with DMR_MOCK_EVENTS server-sent events.
"""

from __future__ import annotations

import asyncio
import os
import sys

from plain_relay import Requests  # run as a script: benches/ is on the path

VERSION = "version: 0.5.0-dev (build 1, commit 0c1e570)\nbuilt with mock for benches\n"
ANSWER = (
    b'{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant",'
    b'"content":"x"}}],"created":1,"model":"mock","object":"chat.completion",'
    b'"usage":{"completion_tokens":1,"prompt_tokens":5,"total_tokens":6}}'
)
EVENT = (
    b'data: {"choices":[{"index":0,"delta":{"content":"x"}}],"object":"chat.completion.chunk"}\n\n'
)


class Handler(Requests):
    def request(self, raw: bytes, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        if head.startswith(b"get /health"):
            self.respond(b'{"status":"ok"}')
        elif b'"stream": true' in body or b'"stream":true' in body:
            asyncio.get_running_loop().create_task(self.stream())
        else:
            self.respond(ANSWER)
            if b"connection: close" in head:
                self.transport.close()

    def respond(self, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
            b"Content-Length: %d\r\nKeep-Alive: timeout=5, max=100\r\n\r\n%b" % (len(body), body)
        )

    async def stream(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for _ in range(int(os.environ.get("DMR_MOCK_EVENTS", "64"))):
            await asyncio.sleep(0.002)
            self.transport.write(b"%x\r\n%b\r\n" % (len(EVENT), EVENT))
        done = b"data: [DONE]\n\n"
        self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
        self.transport.close()


async def serve(path: str) -> None:
    await asyncio.get_running_loop().create_unix_server(Handler, path)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    if "--version" in argv:
        sys.stdout.write(VERSION)
    elif "--help" in argv:
        with open(os.environ["DMR_MOCK_HELP"]) as file:
            sys.stdout.write(file.read())
    else:
        import uvloop

        uvloop.run(serve(argv[argv.index("--host") + 1]))


if __name__ == "__main__":
    main(sys.argv[1:])
