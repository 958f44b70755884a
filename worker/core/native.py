"""The hot path, compiled when it can be: `parse` and `decide_batch` from the Rust extension in
`native/` (module `floorguard_native`), else the Python core's.

The compiled path handles the records that make up nearly every batch (a well-formed command with
no usage to price, where no signature is required, on a wallet the state holds, under a new id) and
hands every other record to the Python core, on the same state objects, in order. It makes the
Python core's own objects (`Parsed`, `Decision`, `Wallet`, the reply dicts), field for field, so
nothing after it can tell the two apart; the Python core stays the definition, and
tests/test_parse_paths.py and tests/test_native.py hold the two together on the fuzzer's records and
on random histories.
Why compiled, and what it saves: docs/design.md, "The compiled hot path".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from worker.core.auth import credentials
from worker.core.codes import Op
from worker.core.decide import decide, decide_batch
from worker.core.model import (
    Command,
    Decision,
    Hold,
    Parsed,
    PartitionState,
    Record,
    ReplyAddress,
    StoredDecision,
    Usage,
    Wallet,
)
from worker.core.parse import parse


class HotPath(NamedTuple):
    parse: Callable[[Record, Collection[str], int | None], Parsed]
    decide_batch: Callable[[PartitionState, Sequence[Parsed]], list[Decision]]
    compiled: bool


PYTHON = HotPath(parse, decide_batch, False)

# The Python core's pieces the compiled path makes and calls (whatever is not the common case).
PARTS = {"Command": Command, "Usage": Usage, "ReplyAddress": ReplyAddress, "Parsed": Parsed, "Wallet": Wallet,
         "Hold": Hold, "Decision": Decision, "StoredDecision": StoredDecision, "Op": Op, "credentials": credentials,
         "parse": parse, "decide": decide}  # fmt: skip

try:
    from floorguard_native import Core
except ImportError as error:  # not built: `make` builds it (native/README.md)
    COMPILED: HotPath | None = None
    MISSING: str | None = str(error)
    COMPILED_COLUMNS: Callable[[Sequence[Decision], Sequence[bytes]], tuple] | None = None
else:
    _core = Core(PARTS)
    COMPILED = HotPath(_core.parse, _core.decide_batch, True)
    MISSING = None
    # worker/store/rows.py's `decision_columns`, compiled: the store chooses it (worker/store/store.py).
    COMPILED_COLUMNS = Core.decision_columns


def hot_path(compiled: bool = True) -> HotPath:
    """The compiled path when asked for and installed, the Python core's otherwise."""
    return COMPILED if compiled and COMPILED is not None else PYTHON
