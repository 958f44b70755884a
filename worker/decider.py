"""Decides the batches of several partitions, then stores them in one transaction.

The store knows the tables and the statements, the core knows the rules; this module knows their
order, in two steps that the worker overlaps (it decides a partition's next batch while the
previous one commits):

1. `decide`: read what the partitions' states lack (wallets, holds, the earlier decisions under
   the batch's ids, or only those its partition decided lately when the others are presumed new,
   prices, the auth state), then run the pure core over each batch, in memory: the same call a
   replay makes.
2. `commit`: one transaction, in one round trip, that locks the partitions' rows and checks that
   each stored position is the one the batch was decided from (else another worker, or a failed
   commit, moved it: the partition is fenced and left out), checks that the auth state has not
   changed since step 1, and writes the decisions (refusing the whole transaction when an id
   presumed new has a decision stored: `StoredAlready`): one flush for every partition in it.

A partition's state (its wallets and holds) is carried from one batch to the next by the worker, so
that a busy partition reads only what it has not seen. It is valid because every wallet is written
by its own partition's batches alone (D33) and the position check fences everyone else.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from dataclasses import dataclass, field

from worker.core.model import Command, Decision, Parsed, PartitionState
from worker.core.native import HotPath, hot_path
from worker.core.outgoing import Outgoing
from worker.store.store import Committed, Fenced, PartitionBatch, Render, Store, Write

# A partition's carried state is started afresh past this many wallets: memory stays bounded, and
# the next batch reads what it names, as after a restart.
WALLETS_CARRIED_MAX = 200_000


class AuthChanged(Exception):
    """Keys or the auth mode changed between deciding a batch and committing it: decide it again."""


@dataclass(slots=True)
class Decided:
    """Batches decided in memory, not yet stored."""

    writes: list[Write] = field(default_factory=list)
    states: dict[int, PartitionState] = field(default_factory=dict)  # each partition's state after its batch
    outcome: dict[int, Committed | Fenced] = field(default_factory=dict)  # partitions settled already
    auth_version: int | None = None  # the auth state the batches were decided under
    presumed: bool = False  # some ids were presumed new, not looked up: the commit may find them stored


def _carried(state: PartitionState, named: set[str], known: int) -> PartitionState:
    """What the partition's next batch starts from. Of the decisions, only this batch's: it may still
    be committing when the next one is decided, while every earlier one is in the database. They
    are the entries after the first `known` (a stored decision always adds a key, and dicts keep
    their order). Past WALLETS_CARRIED_MAX wallets, only this batch's wallets and their holds: the
    batches before it are committed by the time the next one is decided, so the database has the rest."""
    state.decisions = dict(islice(state.decisions.items(), known, None))
    if len(state.wallets) > WALLETS_CARRIED_MAX:
        state.wallets = {name: state.wallets[name] for name in named if name in state.wallets}
        state.holds = {key: hold for key, hold in state.holds.items() if key[0] in named}
    return state


class Decider:
    def __init__(self, store: Store, hot: HotPath | None = None) -> None:
        self._store = store
        self._decide_batch = (hot or hot_path()).decide_batch

    async def decide(self, topic: str, batches: Sequence[PartitionBatch]) -> Decided:
        """Read what each batch needs and decide it. Records below a partition's `seen_offset` were
        decided before and are skipped. A partition's `state`, when given, is the state its last
        batch left (decided, perhaps not yet committed) and is updated in place; without one, the
        partition's stored position must be `seen_offset`, else it is fenced already."""
        decided = Decided()
        fresh: dict[int, tuple[PartitionBatch, list[Parsed]]] = {}
        for batch in batches:
            records = [parsed for parsed in batch.records if parsed.record.offset >= batch.seen_offset]
            assert all(parsed.record.partition == batch.partition for parsed in records)
            if records:
                fresh[batch.partition] = (batch, records)
            else:
                decided.outcome[batch.partition] = Committed(batch.seen_offset, [], None, batch.state)
        if not fresh:
            return decided
        store = self._store
        states: dict[int, PartitionState] = {}
        async with store.connection() as connection:
            unknown = [p for p, (batch, _) in fresh.items() if batch.state is None]
            positions = await store.positions(connection, topic, unknown) if unknown else {}
            for partition, (batch, records) in list(fresh.items()):
                state = batch.state
                if state is None:
                    position = positions.get(partition)
                    if position is None or position.next_offset != batch.seen_offset:
                        decided.outcome[partition] = Fenced(partition, -1 if position is None else position.next_offset)
                        del fresh[partition]
                        continue
                    state = PartitionState(partition, position.clock_ms)
                # Wallets and holds are carried; decisions are looked up per batch (only those of
                # the batch still committing are carried: the database does not have them yet), and
                # prices are read again (a row added since may come in force within this batch).
                if not batch.committing:
                    state.decisions.clear()
                state.prices.clear()
                states[partition] = state
            if not fresh:
                return decided
            doubted = {p: None if batch.look_up_all else batch.recent for p, (batch, _) in fresh.items()}
            decided.presumed = any(doubts is not None for doubts in doubted.values())
            await store.load(connection, states, {p: records for p, (_, records) in fresh.items()}, doubted)
            decided.auth_version, authority = await store.authority(
                connection, [r for _, records in fresh.values() for r in records])
        for partition, (batch, records) in fresh.items():
            state = states[partition]
            state.authority = authority
            named = {p.command.wallet for p in records if p.command.__class__ is Command}
            wallets = state.wallets
            before = {name: wallets.get(name) for name in named}
            known = len(state.decisions)
            decisions = self._decide_batch(state, records)
            if batch.recent is not None:
                batch.recent.add((d.parsed.command.wallet, d.parsed.command.id) for d in decisions if d.stored)
            after = {name: wallets.get(name) for name in named}
            decided.writes.append(Write(partition, batch.seen_offset, records[-1].record.offset + 1, state.clock_ms,
                                        before, after, decisions))  # fmt: skip
            decided.states[partition] = _carried(state, named, known)
        return decided

    async def commit(self, topic: str, decided: Decided, render: Render,
                     published: Sequence[int] = ()) -> dict[int, Committed | Fenced]:  # fmt: skip
        """Store what `decide` decided, in one transaction; each partition's outcome. `published`
        names outbox rows the broker has acknowledged since: they are deleted in the same
        transaction. Raises `AuthChanged` (nothing stored) when keys or modes changed meanwhile.

        A partition found fenced is left out, and the others are stored by a second call: the
        transaction writes nothing when one of its partitions is fenced."""
        outcome = dict(decided.outcome)
        store = self._store
        writes = decided.writes
        sends: dict[int, list[Outgoing]] = {}
        stored: dict[int, list[tuple[Decision, bytes]]] = {}  # each partition's stored decisions and replies
        for write in writes:
            records, replies = sends[write.partition], stored[write.partition] = [], []
            for decision in write.decisions:
                encoded, outgoing = render(decision)
                records += outgoing
                if decision.stored:
                    replies.append((decision, encoded))
        while writes:
            result = await store.commit(topic, writes, sends, stored, published, decided.auth_version)
            if result.auth_version is not None:
                raise AuthChanged()
            if not result.fenced:
                for write in writes:
                    outcome[write.partition] = Committed(write.next_offset, write.decisions,
                                                         result.outboxes.get(write.partition),
                                                         decided.states[write.partition])  # fmt: skip
                return outcome
            for partition, stored_offset in result.fenced.items():
                outcome[partition] = Fenced(partition, stored_offset)
            writes = [write for write in writes if write.partition not in result.fenced]
        await store.delete_outbox(published)
        return outcome

    async def apply(self, topic: str, batches: Sequence[PartitionBatch], render: Render,
                    published: Sequence[int] = ()) -> dict[int, Committed | Fenced]:  # fmt: skip
        """Decide and store, one after the other (a replay's way, and a test's)."""
        return await self.commit(topic, await self.decide(topic, batches), render, published)

    async def apply_one(self, topic: str, batch: PartitionBatch, render: Render) -> Committed:
        """One partition's batch; raises `Fenced` when another worker wrote it meanwhile."""
        outcome = (await self.apply(topic, [batch], render))[batch.partition]
        if isinstance(outcome, Fenced):
            raise outcome
        return outcome
