"""Task settings the coordinator refuses up front (issue 17.4): secure aggregation below the
protocol's safety floors could never run a round (devices refuse such plans too)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from coordinator.schemas import TaskConfig


def _cfg(**secagg: Any) -> dict[str, Any]:
    return {"clients_per_round": 10, "min_reports": 3, "secagg": {"enabled": True, **secagg}}


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"threshold": 1}, "at least 2"),
        ({"neighbours": 8, "threshold": 4}, "strict majority"),
        ({"neighbours": 7, "threshold": 4}, "strict majority"),  # 7 is rounded up to 8
        ({"neighbours": 4, "threshold": 5}, "strict majority"),
    ],
)
def test_secure_aggregation_below_the_floors_is_refused(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TaskConfig.model_validate(_cfg(**over))


def test_a_secure_sum_needs_three_reports() -> None:
    with pytest.raises(ValidationError, match="min_reports >= 3"):
        TaskConfig.model_validate({**_cfg(), "min_reports": 2})
    TaskConfig.model_validate({**_cfg(), "min_reports": 2, "secagg": {"enabled": False}})


def test_settings_at_the_floors_are_accepted() -> None:
    TaskConfig.model_validate(_cfg(neighbours=8, threshold=5))
    TaskConfig.model_validate(_cfg(threshold=2))
