"""Fixtures shared by the test modules."""

import pytest

from dimstream.stream.kafka.tansu import Broker


@pytest.fixture(scope="module")
def broker():
    """A real Kafka-protocol broker (tansu, in memory) per test module; a module that restarts
    the broker defines its own, function-scoped."""
    b = Broker()
    yield b
    b.stop()
