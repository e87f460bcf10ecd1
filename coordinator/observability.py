"""Prometheus metrics and structured (JSON) logs with round and device ids."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "configure_logging", "log_event"]


class Metrics:
    """One registry per app (tests build several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.checkins = Counter("fedkeys_checkins", "Device check-ins by decision", ["decision"], registry=r)
        self.selections = Counter("fedkeys_selections", "Devices selected into rounds", registry=r)
        self.rounds = Counter("fedkeys_rounds", "Finished rounds by outcome", ["kind", "outcome"], registry=r)
        self.bytes_in = Counter("fedkeys_bytes_in", "Request body bytes received", ["route"], registry=r)
        self.bytes_out = Counter("fedkeys_bytes_out", "Artifact bytes sent", ["route"], registry=r)
        self.stage_seconds = Histogram(
            "fedkeys_stage_seconds",
            "Duration of round stages",
            ["stage"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.epsilon_spent = Gauge(
            "fedkeys_privacy_epsilon_spent", "Differential-privacy budget spent by task", ["task"], registry=r
        )
        self.epsilon_target = Gauge(
            "fedkeys_privacy_epsilon_target",
            "Differential-privacy budget target by task",
            ["task"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "fedkeys_request_seconds",
            "Request latency by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=r,
        )


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("round", "task", "device", "stage", "version", "event"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(json_logs: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger("coordinator")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def log_event(logger: logging.Logger, event: str, **fields: Any) -> None:
    """An INFO record whose fields (round, device, ...) land as JSON keys."""
    logger.info(event, extra={"event": event, **fields, "t": time.time()})
