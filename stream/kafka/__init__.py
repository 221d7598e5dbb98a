"""Kafka wire format (Arrow IPC messages)."""
