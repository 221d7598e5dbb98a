"""A rebalance that kafka-python 3.0 can lose, kept alive (the fix Kafka's Java client made in
KAFKA-9815).

A member that performed the group's assignment rejoins when the topic's metadata changes (its
partitions grew, or the broker came back empty and auto-created the topic anew):
`ConsumerCoordinator.need_rejoin` says so only while its assignment snapshot differs from the
metadata snapshot, never by the `rejoin_needed` flag. The join runs as a task on kafka-python's
IO thread; a `poll(timeout_ms)` shorter than the join gives up waiting and leaves the task in
flight. When that member is the leader, the task's own assignment step updates the snapshot, so
need_rejoin turns False while the task is still out: no later poll awaits it again,
`_on_join_complete` never runs, and the consumer sits with no partitions (heartbeats disabled,
nothing read) until it is closed. tests/test_kafka_reset.py's 20 ms polls met this about once in
ten runs under load (a DEBUG log showed the SyncGroup answered, then need_rejoin False forever).

`install(consumer)` makes a rejoin found by need_rejoin sticky, as the Java client does: it also
sets the coordinator's `rejoin_needed`, which kafka-python clears only once the join is complete.
A join task that finished while no poll waited is then replaced by a new JoinGroup at the next
poll (kafka-python's own retry path): one more round trip, not a member with no partitions.

This relies on kafka-python 3.0's `ConsumerCoordinator.need_rejoin`, `request_rejoin` and
`rejoin_needed` (the pin `kafka-python>=3.0,<3.1`, as stream/kafka/bulk.py).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def install(consumer) -> bool:
    """Make this consumer's rejoins sticky until the join completes; False (and one log line) if
    its coordinator is not the kafka-python 3.0 one this was written for (nothing is changed)."""
    from kafka.coordinator.consumer import ConsumerCoordinator

    coordinator = getattr(consumer, "_coordinator", None)
    if not isinstance(coordinator, ConsumerCoordinator) or not hasattr(coordinator, "request_rejoin"):
        log.warning("kafka-python's coordinator is not the 3.0 one: rejoins are not kept sticky")
        return False
    need_rejoin = coordinator.need_rejoin

    def sticky_need_rejoin() -> bool:
        needed = need_rejoin()
        if needed and not coordinator.rejoin_needed:
            coordinator.request_rejoin()  # cleared by join_group_async once the join completes
        return needed

    coordinator.need_rejoin = sticky_need_rejoin
    return True
