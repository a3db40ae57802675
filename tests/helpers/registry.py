"""A real OCI registry (Debian's `docker-registry`, CNCF distribution) on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningRegistry:
    host: str
    root: Path
    process: subprocess.Popen[bytes]
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_registry(
    tmp_path: Path,
    htpasswd: tuple[str, str] | None = None,
    auth: str = "",
    name: str = "registry",
) -> RunningRegistry:
    """Start the registry with a temp root. `htpasswd=(user, password)` turns on basic auth;
    `auth` is a raw `auth:` YAML block for other schemes (token auth)."""
    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    if htpasswd:
        # htpasswd (apache2-utils) writes the bcrypt entries the registry requires.
        entry = subprocess.run(
            ["htpasswd", "-Bbn", *htpasswd], check=True, capture_output=True, text=True
        ).stdout
        (root / "htpasswd").write_text(entry)
        auth = f"""auth:
  htpasswd:
    realm: dmr-test
    path: {root / "htpasswd"}
"""
    config = root / "config.yml"
    config.write_text(
        f"""version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root / "data"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
{auth}"""
    )
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 401 with auth on: it is up
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("docker-registry did not start")
    user, password = htpasswd or (None, None)
    return RunningRegistry(
        host=f"127.0.0.1:{port}", root=root, process=proc, username=user, password=password
    )
