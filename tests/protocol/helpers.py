"""Test helpers: deterministic randomness and a whole secure-aggregation round in-process."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.secagg import SecAggClient, SecAggServer
from protocol.wire import SecAggParams

# Where a device stops: it completes every stage before this one.
ADVERTISE, SHARE, MASK, UNMASK, COMPLETE = range(5)


def det_random(seed: int | str) -> Callable[[int], bytes]:
    """Deterministic byte source (SHA-256 in counter mode) standing in for the OS CSPRNG."""
    state = {"counter": 0}
    base = hashlib.sha256(f"test-random/{seed}".encode()).digest()

    def random_bytes(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["counter"] += 1
            out += hashlib.sha256(base + state["counter"].to_bytes(8, "big")).digest()
        return out[:n]

    return random_bytes


@dataclass
class RoundLog:
    clients: dict[str, SecAggClient] = field(default_factory=dict)
    server: SecAggServer | None = None
    masked: dict[str, npt.NDArray[np.uint32]] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)


def run_round(
    params: SecAggParams,
    inputs: Mapping[str, npt.NDArray[np.uint32]],
    stops: Mapping[str, int] | None = None,
    *,
    serialise: bool = False,
    log: RoundLog | None = None,
) -> npt.NDArray[np.uint32]:
    """Run one round; ``stops[device]`` is the stage a device drops before (default:
    completes). With ``serialise``, server and clients go through to_bytes/from_bytes
    between stages (a coordinator restart). Returns the unmasked sum or raises."""
    stops = stops or {}
    log = log if log is not None else RoundLog()

    def alive(dev: str, stage: int) -> bool:
        return stops.get(dev, COMPLETE) > stage

    def cycle(server: SecAggServer) -> SecAggServer:
        if serialise:
            server = SecAggServer.from_bytes(server.to_bytes())
            for dev, c in list(log.clients.items()):
                log.clients[dev] = SecAggClient.from_bytes(c.to_bytes(), random_bytes=det_random(dev))
        log.server = server
        return server

    server = SecAggServer(params)
    log.server = server
    for dev in sorted(inputs):
        log.clients[dev] = SecAggClient(dev, params, random_bytes=det_random(f"{dev}/{params.round_id}"))
    for dev, c in log.clients.items():
        if alive(dev, ADVERTISE):
            server.add_advertisement(c.advertise_keys())
    roster = server.close_advertise()
    server = cycle(server)
    for dev, c in log.clients.items():
        if alive(dev, SHARE):
            server.add_share_keys(c.share_keys(roster))
    server.close_share_keys()
    server = cycle(server)
    for dev, c in log.clients.items():
        if alive(dev, MASK) and alive(dev, SHARE) and dev not in server.excluded:
            req = server.masked_input_request(dev)
            y = c.masked_input(inputs[dev], req)
            log.masked[dev] = y
            server.add_masked_input(dev, y)
    server = cycle(server)
    request = server.close_masked_input()
    log.survivors = list(request.survivors)
    server = cycle(server)
    responses = [
        log.clients[dev].unmask(request.survivors, request.dropped)
        for dev in request.survivors
        if alive(dev, UNMASK)
    ]
    return server.unmask(responses)
