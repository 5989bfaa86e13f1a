"""The work_queues and delayed sections of the configuration: every key read, defaults,
group overrides by pattern, and the problems reported with their key paths."""

from __future__ import annotations

import pytest

from mqttd.config import ConfigError, Delayed, GroupOverride, WorkQueues, parse_config


def test_defaults() -> None:
    config = parse_config("")
    assert config.work_queues == WorkQueues()
    assert (config.work_queues.max_deliveries, config.work_queues.ack_timeout_s) == (5, -1.0)
    assert config.work_queues.dead_letter_topic == "$dead/{group}/{topic}"
    assert config.delayed == Delayed(enabled=True, max_delay_s=4_294_967, max_messages=100_000)


def test_every_key_is_read_and_overrides_apply_by_group_pattern() -> None:
    config = parse_config("""
work_queues:
  retry_delay_initial_s: 2
  retry_delay_max_s: 30
  retry_delay_multiplier: 3
  retry_delay_jitter: 0
  ack_timeout_s: 15
  max_deliveries: 4
  dead_letter_topic: "dead/{group}/{topic}"
  group_overrides:
    - group: "billing-*"
      ack_timeout_s: -1
      max_deliveries: 10
      dead_letter_topic: "billing/dead/{topic}"
    - group: "*"
      retry_delay_initial_s: 0.5
delayed: {enabled: false, max_delay_s: 3600, max_messages: -1}
""")
    wq = config.work_queues
    assert (wq.retry_delay_initial_s, wq.retry_delay_max_s, wq.retry_delay_multiplier,
            wq.retry_delay_jitter, wq.ack_timeout_s, wq.max_deliveries) == (
        2.0, 30.0, 3.0, 0.0, 15.0, 4)
    assert wq.group_overrides[0] == GroupOverride(
        group="billing-*", ack_timeout_s=-1.0, max_deliveries=10,
        dead_letter_topic="billing/dead/{topic}",
    )
    billing = wq.settings_for("billing-eu")
    assert (billing.ack_timeout_s, billing.max_deliveries, billing.dead_letter_topic,
            billing.retry_delay_initial_s) == (-1.0, 10, "billing/dead/{topic}", 2.0)
    other = wq.settings_for("reports")  # the second entry: only its key changes
    assert (other.retry_delay_initial_s, other.ack_timeout_s, other.max_deliveries) == (
        0.5, 15.0, 4)
    assert config.delayed == Delayed(enabled=False, max_delay_s=3600, max_messages=-1)


BAD = [
    ("work_queues: {max_deliveries: 0}", "work_queues.max_deliveries: must be at least 1, got 0"),
    ("work_queues: {retry_delay_jitter: 1.5}",
     "work_queues.retry_delay_jitter: must be between 0 and 1, got 1.5"),
    ("work_queues: {retry_delay_multiplier: 0.5}",
     "work_queues.retry_delay_multiplier: must be at least 1, got 0.5"),
    ("work_queues: {ack_timeout_s: 0}",
     "work_queues.ack_timeout_s: must be -1 (none) or greater than 0, got 0.0"),
    ("work_queues: {retry_delay_initial_s: '1'}",
     "work_queues.retry_delay_initial_s: expected float, got '1'"),
    ('work_queues: {dead_letter_topic: "dead/{grp}"}',
     "work_queues.dead_letter_topic: may hold {group} and {topic} only, got {grp} in "
     "'dead/{grp}'"),
    ('work_queues: {dead_letter_topic: "dead/+/{topic}"}',
     "work_queues.dead_letter_topic: not a valid topic name template: topic name contains a "
     "wildcard character: 'dead/+/t'"),
    ("work_queues: {group_overrides: [{max_deliveries: 2}]}",
     "work_queues.group_overrides[0].group: must not be empty"),
    ("work_queues: {group_overrides: [{group: g, bogus: 1}]}",
     "work_queues.group_overrides[0].bogus: unknown key"),
    ("delayed: {max_delay_s: 0}", "delayed.max_delay_s: must be at least 1, got 0"),
    ("delayed: {max_messages: 0}",
     "delayed.max_messages: must be -1 (no limit) or at least 1, got 0"),
    ("delayed: {enabled: 1}", "delayed.enabled: expected true or false, got 1"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[t for t, _ in BAD])
def test_bad_values_are_reported_with_their_key_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(text, source="x.yaml")
    assert str(excinfo.value) == f"x.yaml: {message}"
