"""What the daemon's routes share."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from typing import Any

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

    @functools.cached_property
    def _detection(self) -> Any:
        from dmr_cli.runtime.detect import detect

        return detect()

    def detection(self) -> Any:
        """The accelerator, detected once (DMR_GPU overrides); blocking: call in a thread."""
        return self._detection
