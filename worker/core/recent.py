"""The (wallet, id) pairs decided on a partition lately: which ids of a new batch to look up.

A worker looks up an id's earlier decision only when it has a reason to doubt that the id is new:
it was decided on this partition lately (a client's retry, most often seconds later). Every other
id is presumed new, and the batch's commit checks the presumption with the decisions' unique key
(migrations/0007_commit_checks_ids_and_wallets.sql): a wrong presumption costs that batch a second
decision, never a second effect.

So the set may say "doubt it" of an id never added (a false positive: one lookup more), but never
"new" of an id added lately (that would cost a decided batch). A Bloom filter in two generations
fits: 2 bits set per id, 512 KiB a generation; an id is found again with certainty while fewer
than `GENERATION_IDS` ids have been added after it (longer, if it came early in its generation);
false positives about 1.3% per full generation by the arithmetic (11% of the bits set, squared),
so up to about 2.5% when both are full; `tests/test_processor.py` bounds them at 3%.
"""

from __future__ import annotations

from collections.abc import Iterable

GENERATION_BITS = 1 << 22
GENERATION_IDS = 250_000  # 2 bits each in 4 Mi bits: about 11% of the bits set when full
_MASK = GENERATION_BITS - 1


class Recent:
    __slots__ = ("_current", "_previous", "_added")

    def __init__(self) -> None:
        self._current = bytearray(GENERATION_BITS // 8)
        self._previous: bytearray | None = None
        self._added = 0

    def __contains__(self, pair: tuple[str, str]) -> bool:
        """Whether the pair may have been added (certainly, if it was, lately)."""
        h = hash(pair)
        a, b = h & _MASK, (h >> 32) & _MASK
        bits = self._current
        if bits[a >> 3] >> (a & 7) & 1 and bits[b >> 3] >> (b & 7) & 1:
            return True
        bits = self._previous
        return bits is not None and bool(bits[a >> 3] >> (a & 7) & 1 and bits[b >> 3] >> (b & 7) & 1)

    def add(self, pairs: Iterable[tuple[str, str]]) -> None:
        bits, added = self._current, self._added
        for pair in pairs:
            h = hash(pair)
            a, b = h & _MASK, (h >> 32) & _MASK
            bits[a >> 3] |= 1 << (a & 7)
            bits[b >> 3] |= 1 << (b & 7)
            added += 1
            if added == GENERATION_IDS:  # the older generation goes; the newer one stays readable
                self._previous, self._current, added = bits, bytearray(GENERATION_BITS // 8), 0
                bits = self._current
        self._added = added
