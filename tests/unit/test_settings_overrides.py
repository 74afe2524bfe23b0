"""``infra.settings.parse_overrides``: the benchmarks' ``--set SECTION.KEY=VALUE`` options."""

from __future__ import annotations

import pytest

from infra.settings import load_settings, parse_overrides


def test_parse_overrides_reads_json_values_and_keeps_strings() -> None:
    got = parse_overrides(["routing.feedback_window=5000", "kafka.topic_prefix=bench", "tgi.retries=3"])
    assert got == {
        "routing": {"feedback_window": 5000},
        "kafka": {"topic_prefix": "bench"},
        "tgi": {"retries": 3},
    }
    assert load_settings(**got).routing.feedback_window == 5000


@pytest.mark.parametrize("bad", ["routing", "routing.feedback_window", "=1", "routing.=1", "routing.x="])
def test_parse_overrides_rejects_what_is_not_section_key_value(bad: str) -> None:
    with pytest.raises(ValueError, match=r"SECTION\.KEY=VALUE"):
        parse_overrides([bad])
