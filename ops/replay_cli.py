"""`dimstream replay --source SPEC --to kafka://HOST:PORT/TOPIC`."""

from __future__ import annotations

from dimstream.ops.config import ConfigError


def register(sub) -> None:
    p = sub.add_parser("replay", help="publish a dataset to a Kafka topic in event-time order")
    p.add_argument("--source", required=True, help="synthetic | files:DIR | ml-100k:DIR | criteo:FILE | avazu:FILE")
    p.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC (created if missing)")
    p.add_argument("--rows-per-message", type=int, default=1000)
    p.add_argument("--partitions", type=int, default=1, help="partitions of a topic it creates")
    p.add_argument(
        "--key",
        metavar="COLUMN",
        help="partition rows by a hash of this column (every row of a key value in one partition); "
        "default: messages round-robin over the partitions",
    )
    p.add_argument("--max-rows", type=int, help="stop after this many rows (the synthetic stream is endless)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--speed", type=float, help="X times the event-time rate")
    speed.add_argument("--as-fast-as-possible", action="store_true", help="no pacing (default)")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args) -> int:
    from dimstream.ops.replay import parse_kafka_url, replay
    from dimstream.stream.sources.registry import open_source

    try:
        parse_kafka_url(args.to)
        source = open_source(args.source)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None
    if args.rows_per_message < 1:
        raise ConfigError("--rows-per-message must be >= 1")
    try:
        done = replay(source, args.to, args.rows_per_message, args.speed, args.partitions, args.max_rows, key=args.key)
    except ValueError as e:  # e.g. --key names no column of the source
        raise ConfigError(str(e)) from None
    how = f"partitioned by {args.key}" if args.key else "round-robin"
    print(
        f"dimstream replay: {done['rows']:,} rows in {done['messages']:,} messages to {args.to} "
        f"({done['partitions']} partitions, {how})"
    )
    return 0
