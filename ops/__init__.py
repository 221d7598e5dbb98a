"""dimstream.ops: wires stream, models and search into the daemon, the cron job and the CLI."""
