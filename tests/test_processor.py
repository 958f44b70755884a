"""Unit tests of the processor's bookkeeping, with a store and a publisher in memory (the whole
path, against the real services, is in test_crash_and_fencing.py and test_chaos.py)."""

import asyncio

from worker.adapter.processor import Partition, Phase, Processor
from worker.config import Topics
from worker.core.outgoing import Outgoing
from worker.store.store import Outbox
from worker.sweeper import BrokerClock


class LeftOutbox:
    """A store whose one partition has an outbox row a crash left; reading it takes a moment."""

    def __init__(self) -> None:
        self.rows = [Outbox(7, [Outgoing("fg.replies", None, b"k", b"{}", ())])]
        self.deleted: list[int] = []

    async def pending_outbox(self, topic: str, partition: int) -> list[Outbox]:
        await asyncio.sleep(0.01)
        return list(self.rows)

    async def delete_outbox(self, positions: list[int]) -> None:
        self.deleted += positions
        self.rows = [row for row in self.rows if row.position not in positions]


class Recording:
    def __init__(self) -> None:
        self.published: list[Outgoing] = []

    async def publish(self, records) -> None:
        await asyncio.sleep(0.01)
        self.published += records


async def test_what_a_partition_left_in_its_outbox_is_published_once_however_many_ask_at_once():
    # The assignment, the partition's first batch and `tend` may each find it just claimed.
    store, publisher = LeftOutbox(), Recording()
    processor = Processor(lambda: store, publisher, Topics("fg"), lambda: None, BrokerClock())
    partition = Partition(3, next_offset=0)

    await asyncio.gather(*(processor._heal(partition) for _ in range(3)))

    assert len(publisher.published) == 1
    assert store.deleted == [7]
    assert partition.phase is Phase.READY


async def test_a_partition_claimed_again_publishes_its_outbox_again():
    store, publisher = LeftOutbox(), Recording()
    processor = Processor(lambda: store, publisher, Topics("fg"), lambda: None, BrokerClock())
    partition = Partition(3, next_offset=0)
    await processor._heal(partition)
    store.rows = [Outbox(8, [Outgoing("fg.replies", None, b"k", b"{}", ())])]  # a fenced commit's row
    partition.phase = Phase.CLAIMED

    await processor._heal(partition)

    assert len(publisher.published) == 2
    assert store.deleted == [7, 8]


def test_recent_ids_are_always_doubted_and_few_others_are():
    from worker.core.recent import GENERATION_IDS, Recent

    recent = Recent()
    added = [("w", f"c{n}") for n in range(GENERATION_IDS + 1000)]  # into a second generation
    for start in range(0, len(added), 997):
        recent.add(added[start:start + 997])
    assert all(pair in recent for pair in added)
    others = [("w", f"other{n}") for n in range(20_000)]
    assert sum(pair in recent for pair in others) < len(others) * 0.03  # a false positive costs one lookup
    recent.add(("x", f"c{n}") for n in range(2 * GENERATION_IDS))  # two generations later
    assert sum(pair in recent for pair in added) < len(added) * 0.03  # forgotten: presumed new, checked by the commit
