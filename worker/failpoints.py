"""Named points where a test may make the worker die, as a real crash would.

`FLOORGUARD_FAILPOINT=after_commit:3` kills the process with SIGKILL at the third time it
passes `after_commit` (a batch committed, its replies and events not yet published). Unset in
production, where `hit` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV_FAILPOINT = "FLOORGUARD_FAILPOINT"


def _armed() -> dict[str, int]:
    spec = os.environ.get(ENV_FAILPOINT, "")
    if not spec:
        return {}
    name, _, count = spec.partition(":")
    return {name: int(count or 1)}


_remaining = _armed()


def hit(name: str) -> None:
    if name not in _remaining:
        return
    _remaining[name] -= 1
    if _remaining[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
