"""The plan a round keeps from the moment it opens: what it trains, with which parameters.

Stored as JSON in ``rounds.plan`` and read through :func:`plan_of` (typed, validated once per
round and worker); the device-facing :class:`protocol.wire.RoundPlan` is made from it
(``coordinator.services.rounds.plan_for``). Everything in it is fixed when the round opens,
except ``unmask``, which the masked-input stage's close adds.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from coordinator.db.models import Round
from coordinator.dp_plan import PrivacyPlan
from coordinator.schemas import DeadlineSettings, TrainingSettings
from protocol.codec import CodecParams
from protocol.wire import RoundKind, SecAggParams, UnmaskRequest

__all__ = ["StoredPlan", "plan_of", "set_plan", "stored_plan"]


class StoredPlan(BaseModel):
    """A round's plan (``rounds.plan``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # older rows may carry more keys

    task: str
    kind: RoundKind
    model_version: int
    bundle_dir: str
    weights_file: str
    weights_sha256: str
    layout_hash: str
    dim: int
    """Trainable parameters (the layout's size)."""
    clients_per_round: int
    """Updates the round takes (K)."""
    min_reports: int
    """Fewer by the upload deadline: the round fails."""
    training: TrainingSettings
    deadlines: DeadlineSettings
    codec: CodecParams | None = None
    """None: plain float32 updates."""
    secagg: SecAggParams | None = None
    """None: no secure aggregation."""
    dp: PrivacyPlan | None = None
    selection_seed: str = Field(default_factory=lambda: secrets.token_hex(32))
    """Hex of 32 bytes from the OS CSPRNG, drawn when the round opens: nobody can predict (and
    enrol identities to game) which of a selection's candidates it takes."""
    unmask: UnmaskRequest | None = None
    """Survivors and dropped devices, set when the masked-input stage closes."""
    plain_weight_cap: int = 1 << 30
    """The task's ``codec.weight_cap`` for rounds of plain float32 updates (no codec), so that a
    float32 run weighs devices as the compressed one does and the two differ only in the
    codec; plans stored before it had none (uncapped)."""

    @property
    def weight_cap(self) -> int:
        """The largest example-count weight of one plain update."""
        return self.codec.weight_cap if self.codec is not None else self.plain_weight_cap


_CACHE_SIZE = 64
_cache: OrderedDict[tuple[int, str, bool], StoredPlan] = OrderedDict()
_lock = threading.Lock()


def plan_of(rnd: Round) -> StoredPlan:
    """The round's plan, validated once per worker (:func:`stored_plan`)."""
    return stored_plan(rnd.id, rnd.plan)


def stored_plan(round_id: int, raw: dict[str, Any]) -> StoredPlan:
    """Round ``round_id``'s plan from its stored JSON, validated once per worker. The cache key
    is the round's id, its random selection seed (ids repeat across databases, e.g. tests in
    one process) and whether ``unmask`` is set (the one change a plan sees)."""
    seed = raw.get("selection_seed")
    if not isinstance(seed, str):  # a round opened before plans carried a seed
        return StoredPlan.model_validate(raw)
    key = (round_id, seed, raw.get("unmask") is not None)
    with _lock:
        got = _cache.get(key)
        if got is not None:
            _cache.move_to_end(key)
            return got
    got = StoredPlan.model_validate(raw)
    with _lock:
        _cache[key] = got
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return got


def set_plan(rnd: Round, plan: StoredPlan) -> None:
    rnd.plan = plan.model_dump(mode="json")
