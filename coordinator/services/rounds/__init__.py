"""Rounds: check-in and selection, the secure-aggregation stages, deadlines, aggregation.

Every mutation of a round locks its row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
transactions take the database write lock at BEGIN), so several workers and replicas can serve
the same round: a stage closes once, a device is selected once (primary key of
``participants``), an upload is counted once (the participant's stage only moves forward).
All state a round needs is in its row (plan, secure-aggregation server state with the running
sum), so a restarted coordinator continues where the database says it was.

Flow of a training round with secure aggregation:

    selecting -> advertise_keys -> share_keys -> masked_input -> unmask -> aggregating -> done

without secure aggregation ``selecting -> upload -> aggregating -> done``, and an evaluation
round ``selecting -> evaluating -> done``. Devices that miss a stage's deadline are dropped;
too few left and the round fails with the model unchanged.

Modules, in the order a round meets them:

- :mod:`.context`: the worker's :class:`RoundContext` (clock, stores, caches), stage names,
  errors;
- :mod:`.plans`: opening a task's next round and the plan stored with it;
- :mod:`.checkin`: the worker's round view, eligibility, selection pools, pace steering;
- :mod:`.stages`: the stage machine (when a stage is due, under the round's lock);
- :mod:`.closes`: one close per stage;
- :mod:`.messages`: the devices' messages within a round;
- :mod:`.uploads`: upload checks and writes, the sum without secure aggregation.

Aggregation itself is :mod:`coordinator.services.aggregate`.
"""

from __future__ import annotations

from coordinator.services.rounds.checkin import (
    Candidacy,
    answer_from_view,
    checkin,
    current_views,
    join_pool,
    view_moved,
)
from coordinator.services.rounds.closes import fail_round_now
from coordinator.services.rounds.context import (
    RETRYABLE,
    Forbidden,
    Gone,
    RoundContext,
    RoundView,
    StageConflict,
    Views,
    utc,
)
from coordinator.services.rounds.messages import (
    PAYLOAD_STAGES,
    advertise,
    carries_payload,
    evaluation,
    inbound_shares,
    report,
    roster,
    round_for_device,
    share_keys,
    status_of,
    unmask,
    unmask_request,
    unmask_responses,
    with_payload,
)
from coordinator.services.rounds.plans import open_rounds, plan_for
from coordinator.services.rounds.stages import close_if_complete, fail_after_error, fail_round, quiet_enough
from coordinator.services.rounds.uploads import check_upload, expected_upload, plain_sum, upload

__all__ = [
    "PAYLOAD_STAGES",
    "RETRYABLE",
    "Candidacy",
    "Forbidden",
    "Gone",
    "RoundContext",
    "RoundView",
    "StageConflict",
    "Views",
    "advertise",
    "answer_from_view",
    "carries_payload",
    "check_upload",
    "checkin",
    "close_if_complete",
    "current_views",
    "evaluation",
    "expected_upload",
    "fail_after_error",
    "fail_round",
    "fail_round_now",
    "inbound_shares",
    "join_pool",
    "open_rounds",
    "plain_sum",
    "plan_for",
    "quiet_enough",
    "report",
    "roster",
    "round_for_device",
    "share_keys",
    "status_of",
    "unmask",
    "unmask_request",
    "unmask_responses",
    "upload",
    "utc",
    "view_moved",
    "with_payload",
]
