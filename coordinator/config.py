"""The coordinator's configuration: one pydantic-settings object, environment prefix FEDKEYS_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


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
    enrollment_secret: SecretStr = Field(default=SecretStr(""), description="fleet enrolment secret")
    admin_token: SecretStr = Field(default=SecretStr(""), description="bearer token of the admin API")
    max_body_bytes: int = 64 * 1024 * 1024  # larger device request bodies are refused with 413
    max_bundle_bytes: int = 2 * 1024 * 1024 * 1024  # admin bundle uploads (a whole model)
    rate_limit_per_minute: int = 600  # requests per device per minute (429 beyond)
    # scheduling
    tick_seconds: float = 0.5  # how often each worker checks round deadlines
    idle_retry_seconds: float = 60.0  # retry_after when no round needs devices
    min_retry_seconds: float = 1.0
    # candidates in a selecting round's pool come back this often: selection closes the moment
    # the pool fills, and the selected must advertise keys within the advertise deadline
    candidate_poll_seconds: float = 1.0
    max_retry_seconds: float = 900.0
    # threads (and soft-state database connections) per worker for check-ins: the GIL runs one
    # at a time, so a few suffice to overlap database round trips
    checkin_threads: int = Field(default=6, ge=1, le=64)
    # threads per worker for every other request (AnyIO's default is 40). Fewer than the
    # database pool's 30 connections: a thread that holds one of them while it waits for a
    # connection would otherwise starve the requests that hold connections and need a thread
    # to finish (with 1,000 devices a worker stalled for minutes that way)
    request_threads: int = Field(default=24, ge=1, le=256)

    # publishing new predict.pte for committed versions (needs the export extra)
    publish_predict: bool = True
    log_json: bool = True


@lru_cache
def get_settings() -> Settings:
    return Settings()
