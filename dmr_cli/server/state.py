"""What the daemon's routes share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dmr_cli.store import Store

MAX_CONCURRENT_PULLS = 2


@dataclass
class State:
    store: Store
    pull_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_PULLS)
    )
