"""The coordinator's configuration: one pydantic-settings object, environment prefix FEDKEYS_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


def _unlimited(value: object) -> object:
    """``"unlimited"`` (any case) or ``"none"`` means no bound: a limit that can only be lifted
    by saying so, never by leaving the variable empty."""
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "none"):
        return None
    return value


class Settings(BaseSettings):
    """Every knob of the service. Secrets are ``SecretStr`` so they never reach logs or reprs."""

    model_config = SettingsConfigDict(env_prefix="FEDKEYS_", env_file=None, extra="ignore")

    # storage
    database_url: str = "sqlite:///fedkeys-data/coordinator.db"  # or postgresql+psycopg://...
    # PostgreSQL: a statement waiting longer than this for a row lock fails (503, the client
    # retries). A request's transaction stays open between its dependency's thread and its
    # endpoint's, so without a bound, requests waiting on a device's row lock can take every
    # thread the lock holder needs to finish: the whole worker stops (seen with 1,000 devices).
    db_lock_timeout_seconds: float = Field(default=10.0, gt=0, le=600)
    data_dir: Path = Path("fedkeys-data")  # bundles, weights of every model version
    # security
    enrollment_secret: SecretStr = Field(
        default=SecretStr(""),
        description="fleet enrolment secret for simulated fleets (off when empty); devices "
        "otherwise enrol with one-time codes minted by the admin",
    )
    admin_token: SecretStr = Field(default=SecretStr(""), description="bearer token of the admin API")
    max_body_bytes: int = 64 * 1024 * 1024  # larger device request bodies are refused with 413
    max_bundle_bytes: int = 2 * 1024 * 1024 * 1024  # admin bundle uploads (a whole model)
    # every JSON request body (check-in, secure-aggregation messages, admin task routes) is
    # refused with 413 beyond this, before anything parses it (coordinator.api.guard). The
    # largest is a device's shares, about 730 bytes per neighbour: 1 MiB holds ~1,400 (a
    # complete graph of 1,000 devices needs 999); raise it for larger complete graphs
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # /metrics reads the per-task privacy budget from the database at most this often
    metrics_refresh_seconds: float = Field(default=15.0, ge=0, le=3600)
    rate_limit_per_minute: int = 600  # requests per device per minute (429 beyond)
    # enrolment attempts (successful or not) per minute, per client address (an IPv6 /64) and
    # in all; counted in the database, so every worker and replica shares them (429 beyond)
    enrollment_per_address_per_minute: int = Field(default=20, ge=1)
    enrollment_per_minute: int = Field(default=600, ge=1)
    # devices the fleet secret may enrol (revoked ones count): "unlimited" must be said
    enrollment_secret_max_devices: Annotated[int | None, BeforeValidator(_unlimited)] = Field(
        default=1000, ge=1
    )
    # seconds an idle HTTP connection stays open (uvicorn's default is 5). Idle devices check
    # in every 30-120 s and a selected one is quiet while it trains: at 5 s nearly every
    # check-in and every post-training request paid a new TLS handshake (1.7 ms of coordinator
    # CPU against 0.7 ms for a check-in on a kept connection). Devices keep theirs a little
    # shorter (edge_client.transport.KEEPALIVE_SECONDS), so the server is not the side closing
    # a connection a request is on its way over.
    keep_alive_seconds: int = Field(default=150, ge=1, le=3600)
    # scheduling
    tick_seconds: float = 0.5  # how often each worker checks round deadlines
    idle_retry_seconds: float = 60.0  # retry_after when no round needs devices
    min_retry_seconds: float = 1.0
    # candidates in a selecting round's pool come back this often: selection closes the moment
    # the pool fills, and the selected must advertise keys within the advertise deadline
    candidate_poll_seconds: float = 1.0
    # a candidate's check-in is held until its selection ends, at most this long (then it comes
    # back after candidate_poll_seconds): well below a device's request timeout (60 s)
    candidate_hold_seconds: float = Field(default=20.0, ge=0, le=50)
    max_retry_seconds: float = 900.0
    # threads (and soft-state database connections) per worker for check-ins: the GIL runs one
    # at a time, so a few suffice to overlap database round trips
    checkin_threads: int = Field(default=6, ge=1, le=64)
    # threads per worker for every other request (AnyIO's default is 40). Fewer than the
    # database pool's connections (these + app.BACKGROUND_CONNECTIONS, and 4 more when needed):
    # a thread that holds one of them while it waits for a connection would otherwise starve
    # the requests that hold connections and need a thread to finish (with 1,000 devices a
    # worker stalled for minutes that way)
    request_threads: int = Field(default=24, ge=1, le=256)

    # weight deltas: served only from the last N versions before the one asked for (older
    # bases get 410 and download the whole vector); the on-disk cache of deltas is bounded
    delta_max_base_age: int = Field(default=4, ge=0, le=1000)
    delta_cache_max_files: int = Field(default=64, ge=1)
    delta_cache_max_bytes: int = Field(default=1 << 30, ge=1)

    # publishing new predict.pte for committed versions (needs the export extra)
    publish_predict: bool = True
    log_json: bool = True
    # > 0: each worker meters the CPU time of every request by route (coordinator.profiling)
    # and logs its cumulative table every this many seconds; 0: off (no metering at all)
    route_cpu_log_seconds: float = Field(default=0.0, ge=0, le=3600)


@lru_cache
def get_settings() -> Settings:
    return Settings()
