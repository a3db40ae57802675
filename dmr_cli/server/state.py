"""What the daemon's routes share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from dmr_cli.server.metrics import Metrics
from dmr_cli.server.recorder import Recorder
from dmr_cli.server.scheduler import Scheduler
from dmr_cli.store import Store

MAX_CONCURRENT_PULLS = 2


@dataclass
class State:
    store: Store
    scheduler: Scheduler
    metrics: Metrics = field(default_factory=Metrics)
    recorder: Recorder = field(default_factory=Recorder)
    pull_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_PULLS)
    )
