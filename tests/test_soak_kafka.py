"""A short Kafka soak (benchmarks/soak.py --source kafka): the soak's input produced into a topic
of a real tansu broker, a real `dimstream run` on it SIGKILLed twice after a checkpoint and
restarted (resuming from its checkpointed Kafka positions), a bad input every other window;
every window must be in the history once and in order, every good row trained once in its
window (the DIMSTREAM_TRAINED_IDS audit), every bad row and the garbage message dead-lettered
once with its reason.

Every kind is in, `late` too: lateness is judged per message (stream/window.py), so a late row
read after a restart in one poll with the rows that passed its window (a poll after a restart
reads further ahead than the killed daemon's did) is dead-lettered as in any other poll, not
trained in its window. `python benchmarks/soak.py --source kafka --windows 300 --kills 8` is
the long form (benchmarks/results/soak-kafka.json)."""

from benchmarks.soak import passed, soak

KINDS = ("nan_label", "wrong_type", "bad_event_time", "late", "corrupt_input")


def test_short_kafka_soak_with_two_kills_and_bad_inputs(broker, tmp_path):
    # a Kafka-fed daemon trains a read-ahead poll's windows in moments: kill soon after a checkpoint
    s = soak(20, 40, 2, 2, 0, tmp_path, max_delay=0.3, bootstrap=broker.bootstrap, kinds=KINDS)
    assert s["kills"] == 2 and s["starts"] == 3
    # windows 1, 3, 5, ... 19 hold a bad input, the kinds in turn
    assert s["bad_inputs"] == {k: 2 for k in KINDS}
    assert passed(s), {k: v for k, v in s.items() if k != "bad_inputs"}
    assert s["every_corrupt_message_dead_lettered_once"] and s["dead_letter_inputs"] == 2
    assert s["every_good_row_trained_once_in_its_window"]
    assert s["rows_trained"] == s["rows_expected"] == 20 * 80 - 8
    assert s["dead_letter_rows"] == 8
