"""Docker credential helpers: `docker-credential-<name> get` (`credsStore` / `credHelpers`).

Lives in runtime/ because it is the one place registry auth needs to run a program.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess

log = logging.getLogger(__name__)

# A helper name becomes part of an executable name looked up on PATH: no paths, no options.
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def credential_helper_get(
    helper: str, server_url: str, *, timeout: float = 15.0
) -> tuple[str, str] | None:
    """`(username, secret)` the helper holds for `server_url`; None when it is absent or has none.

    A username of `<token>` means the secret is an identity (refresh) token, as in docker.
    """
    if not _HELPER_NAME.match(helper):
        log.warning("ignoring credential helper with an invalid name: %r", helper)
        return None
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        log.debug("credential helper docker-credential-%s is not installed", helper)
        return None
    try:
        proc = subprocess.run(
            [exe, "get"],
            input=server_url.encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("credential helper docker-credential-%s failed: %s", helper, type(exc).__name__)
        return None
    if proc.returncode != 0:
        # "credentials not found in native keychain" is the usual reason; stderr is not logged
        # because some helpers echo what they were given.
        log.debug("docker-credential-%s has no credentials for %s", helper, server_url)
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        log.warning("credential helper docker-credential-%s printed invalid JSON", helper)
        return None
    if not isinstance(data, dict):
        return None
    username, secret = data.get("Username"), data.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        return None
    return username, secret
