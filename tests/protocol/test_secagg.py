"""Secure aggregation end to end: exact sums under tolerable dropouts, loud failure beyond,
stage order, duplicates, state serialisation, and what a masked vector reveals."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.secagg import (
    DuplicateInputError,
    SecAggClient,
    SecAggError,
    SecAggServer,
    StageError,
    UnrecoverableError,
    neighbour_graph,
    resolve_graph,
    secagg_params_for,
)
from protocol.secagg import server as secagg_server
from protocol.wire import (
    EncryptedShare,
    MaskedInputRequest,
    SecAggParams,
    ShareKeysRequest,
    Stage,
    UnmaskResponse,
)
from tests.protocol.helpers import (
    ADVERTISE,
    COMPLETE,
    MASK,
    SHARE,
    UNMASK,
    RoundLog,
    det_random,
    run_round,
)


def _params(n_len: int, bits: int, **kw: object) -> SecAggParams:
    return SecAggParams(
        round_id=kw.pop("round_id", 42),
        vector_length=n_len,
        ring_bits=bits,
        graph_seed=kw.pop("graph_seed", b"\x07" * 32),
        **kw,
    )


def _inputs(devices: list[str], length: int, bits: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {d: rng.integers(0, 1 << bits, length, dtype=np.uint64).astype(np.uint32) for d in devices}


def _expected_outcome(
    params: SecAggParams, devices: list[str], stops: dict[str, int]
) -> tuple[str, set[str]]:
    """Reference model of the protocol's dropout rule: ("ok", survivors) or ("fail", {})."""
    advertised = [d for d in devices if stops.get(d, COMPLETE) > ADVERTISE]
    try:
        degree, t = resolve_graph(params, len(advertised))
    except SecAggError:
        return "fail", set()
    graph = neighbour_graph(advertised, params.graph_seed, degree)
    shared = {d for d in advertised if stops.get(d, COMPLETE) > SHARE}
    active = set(shared)
    while True:  # devices with fewer than t sharing neighbours are left out
        starving = {u for u in active if len(graph[u] & active) < t - 1}
        if not starving:
            break
        active -= starving
    if len(active) < params.min_devices:
        return "fail", set()
    masked = {d for d in active if stops.get(d, COMPLETE) > MASK}
    if len(masked) < max(t, params.min_devices):
        return "fail", set()
    answered = {d for d in masked if stops.get(d, COMPLETE) > UNMASK}
    # dropped devices: t neighbours that answer; survivors: their own share counts too
    if any(len(graph[u] & answered) + (u in answered) < t for u in active):
        return "fail", set()
    return "ok", masked


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggParams, list[str], dict[str, int], int]:
    n = draw(st.integers(2, 11))
    bits = draw(st.integers(1, 32))
    length = draw(st.integers(1, 24))
    degree = draw(st.one_of(st.none(), st.integers(1, 12)))
    threshold = draw(st.one_of(st.none(), st.integers(1, 6)))
    devices = [f"d{i}" for i in range(n)]
    # mostly completing devices, some dropping at each stage
    stops = {d: draw(st.sampled_from([COMPLETE] * 4 + [ADVERTISE, SHARE, MASK, UNMASK])) for d in devices}
    dropout = draw(st.sampled_from([0.0, 0.0, 0.3]))  # the default degree sized for a loss
    params = _params(length, bits, degree=degree, threshold=threshold, dropout=dropout)
    return params, devices, stops, draw(st.integers(0, 2**16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds(), serialise=st.booleans())
def test_sum_is_exact_within_tolerance_and_fails_loudly_beyond(
    case: tuple[SecAggParams, list[str], dict[str, int], int], serialise: bool
) -> None:
    params, devices, stops, seed = case
    inputs = _inputs(devices, params.vector_length, params.ring_bits, seed)
    outcome, survivors = _expected_outcome(params, devices, stops)
    event(f"outcome={outcome}")
    log = RoundLog()
    if outcome == "fail":
        with pytest.raises(SecAggError):
            run_round(params, inputs, stops, serialise=serialise, log=log)
        return
    total = run_round(params, inputs, stops, serialise=serialise, log=log)
    assert set(log.survivors) == survivors
    expected = codec.ring_sum([inputs[d] for d in sorted(survivors)], params.ring_bits)
    np.testing.assert_array_equal(total, expected)


def test_ten_percent_dropout_at_n50_is_exact() -> None:
    devices = [f"dev{i:02d}" for i in range(50)]
    params = _params(300, 20)
    inputs = _inputs(devices, 300, 20, 1)
    stops = dict.fromkeys(devices[::10], MASK)  # 5 devices drop after sharing keys
    stops.update(dict.fromkeys(devices[3::17], UNMASK))  # 3 more never answer the unmask stage
    total = run_round(params, inputs, stops)
    survivors = [d for d in devices if stops.get(d) != MASK]
    np.testing.assert_array_equal(total, codec.ring_sum([inputs[d] for d in survivors], 20))
    degree, t = resolve_graph(params, 50)
    assert (degree, t) == (12, 7)


def test_unrecoverable_round_names_the_devices() -> None:
    devices = [f"dev{i:02d}" for i in range(20)]
    params = _params(8, 16)
    graph = neighbour_graph(devices, params.graph_seed)
    degree, t = resolve_graph(params, 20)
    victim = devices[0]
    # the victim drops after sharing keys; all but t-1 of its neighbours send their input and
    # then vanish before unmask: only t-1 shares of its mask key can come back
    nbrs = sorted(graph[victim])
    stops = dict.fromkeys(nbrs[: degree - t + 1], UNMASK)
    stops[victim] = MASK
    inputs = _inputs(devices, 8, 16, 2)
    with pytest.raises(UnrecoverableError) as err:
        run_round(params, inputs, stops)
    assert victim in err.value.devices
    assert err.value.devices[victim] == t - 1
    assert repr(victim) in str(err.value)


def test_a_graph_sized_for_the_dropout_recovers_what_the_log_n_graph_cannot() -> None:
    devices = [f"dev{i:02d}" for i in range(40)]
    plain = _params(8, 16)
    degree, t = resolve_graph(plain, 40)
    assert (degree, t) == (12, 7)
    victim = devices[0]
    # the victim and 6 of its 12 neighbours drop after sharing keys (7 of 40 devices, 17.5%)
    lost = [victim, *sorted(neighbour_graph(devices, plain.graph_seed, degree)[victim])[: degree - t + 1]]
    stops = dict.fromkeys(lost, MASK)
    inputs = _inputs(devices, 8, 16, 4)
    with pytest.raises(UnrecoverableError):
        run_round(plain, inputs, stops)
    sized = _params(8, 16, dropout=0.3)
    assert resolve_graph(sized, 40)[0] > degree
    total = run_round(sized, inputs, stops)
    survivors = [d for d in devices if d not in lost]
    np.testing.assert_array_equal(total, codec.ring_sum([inputs[d] for d in survivors], 16))


def test_too_many_drops_before_unmask_fail_early_with_names() -> None:
    devices = [f"d{i}" for i in range(6)]  # complete graph, degree 5, t = 3
    params = _params(4, 8)
    stops = dict.fromkeys(devices[:3], MASK)  # 3 survivors: each dropped device has 3 alive nbrs
    run_round(params, _inputs(devices, 4, 8, 3), stops)  # within tolerance
    stops = dict.fromkeys(devices[:4], MASK)  # 2 survivors < t
    with pytest.raises(SecAggError, match="masked inputs arrived"):
        run_round(params, _inputs(devices, 4, 8, 3), stops)


def _setup(
    n: int = 5, length: int = 16, bits: int = 12
) -> tuple[SecAggParams, dict[str, SecAggClient], SecAggServer]:
    params = _params(length, bits)
    clients = {f"d{i}": SecAggClient(f"d{i}", params, random_bytes=det_random(i)) for i in range(n)}
    return params, clients, SecAggServer(params)


def _to_masked_stage(clients: dict[str, SecAggClient], server: SecAggServer) -> None:
    for c in clients.values():
        server.add_advertisement(c.advertise_keys())
    roster = server.close_advertise()
    for c in clients.values():
        server.add_share_keys(c.share_keys(roster))
    server.close_share_keys()


def test_stage_order_is_enforced() -> None:
    params, clients, server = _setup()
    c = clients["d0"]
    x = np.zeros(params.vector_length, dtype=np.uint32)
    with pytest.raises(StageError):
        c.masked_input(x, [])
    with pytest.raises(StageError):
        server.add_masked_input("d0", x)
    with pytest.raises(StageError):
        server.unmask()
    _to_masked_stage(clients, server)
    with pytest.raises(StageError):
        c.advertise_keys()
    with pytest.raises(StageError):
        server.close_advertise()
    with pytest.raises(StageError):
        c.unmask(["d0"], [])
    assert server.stage is Stage.MASKED_INPUT


def test_duplicates_are_refused_or_idempotent() -> None:
    params, clients, server = _setup()
    ads = {d: c.advertise_keys() for d, c in clients.items()}
    for a in ads.values():
        server.add_advertisement(a)
    server.add_advertisement(ads["d1"])  # identical resend: fine
    impostor = SecAggClient("d1", params, random_bytes=det_random("other")).advertise_keys()
    with pytest.raises(DuplicateInputError):
        server.add_advertisement(impostor)
    roster = server.close_advertise()
    for c in clients.values():
        server.add_share_keys(c.share_keys(roster))
    server.close_share_keys()
    values = {}
    for d, c in clients.items():
        values[d] = np.arange(params.vector_length, dtype=np.uint32)
        server.add_masked_input(d, c.masked_input(values[d], server.masked_input_request(d)))
    with pytest.raises(DuplicateInputError):
        server.add_masked_input("d0", values["d0"])
    req = server.close_masked_input()
    first = clients["d0"].unmask(req.survivors, req.dropped)
    assert clients["d0"].unmask(req.survivors, req.dropped) == first  # idempotent retry
    with pytest.raises(SecAggError, match="different unmask request"):
        clients["d0"].unmask(req.survivors[:-1], (*req.dropped, req.survivors[-1]))
    server.add_unmask_response(first)
    server.add_unmask_response(first)
    other = UnmaskResponse(round_id=first.round_id, sender="d0", self_mask_shares=(), key_shares=())
    with pytest.raises(DuplicateInputError):
        server.add_unmask_response(other)


def test_client_never_reveals_both_secrets_of_a_device() -> None:
    devices = [f"d{i}" for i in range(9)]
    params = _params(10, 16)
    stops = {"d0": MASK, "d4": MASK}
    log = RoundLog()
    run_round(params, _inputs(devices, 10, 16, 5), stops, log=log)
    assert log.server is not None
    request_survivors = set(log.survivors)
    revealed_self: set[str] = set()
    revealed_key: set[str] = set()
    for d in log.survivors:
        c = log.clients[d]
        resp = c.unmask(log.survivors, sorted(set(devices) - request_survivors))
        revealed_self |= {s.owner for s in resp.self_mask_shares}
        revealed_key |= {s.owner for s in resp.key_shares}
    assert revealed_key == {"d0", "d4"}
    assert revealed_self == request_survivors
    assert not revealed_self & revealed_key


def test_server_refuses_a_share_of_the_wrong_kind() -> None:
    params, clients, server = _setup()
    _to_masked_stage(clients, server)
    for d, c in clients.items():
        if d != "d4":
            x = np.zeros(params.vector_length, dtype=np.uint32)
            server.add_masked_input(d, c.masked_input(x, server.masked_input_request(d)))
    req = server.close_masked_input()
    assert req.dropped == ("d4",)
    honest = clients["d0"].unmask(req.survivors, req.dropped)
    forged = UnmaskResponse(
        round_id=honest.round_id,
        sender="d0",
        self_mask_shares=(
            *honest.self_mask_shares,
            *(s.model_copy(update={}) for s in honest.key_shares),
        ),
        key_shares=(),
    )
    with pytest.raises(SecAggError, match="self-mask share of 'd4'"):
        server.add_unmask_response(forged)


def _unmask_all(
    clients: dict[str, SecAggClient],
    server: SecAggServer,
    xs: dict[str, np.ndarray],
    shares: dict[str, tuple[EncryptedShare, ...]],
) -> tuple[np.ndarray, list[UnmaskResponse]]:
    """Stages 3 and 4 as the coordinator runs them: every upload's omissions are recorded
    before any input is added, and omitted devices' inputs are left out."""
    masked = {d: c.masked_input(xs[d], shares[d]) for d, c in clients.items()}
    for d, c in clients.items():
        server.record_omissions(d, c.omitted)
    for d, y in masked.items():
        if d not in server.accused:
            server.add_masked_input(d, y)
    req = server.close_masked_input()
    responses = [clients[d].unmask(req.survivors, req.dropped) for d in req.survivors]
    return server.unmask(responses), responses


def _garble(share: EncryptedShare) -> EncryptedShare:
    bad = bytearray(share.ciphertext)
    bad[0] ^= 1
    return share.model_copy(update={"ciphertext": bytes(bad)})


def test_a_neighbour_with_an_unusable_share_is_treated_as_dropped() -> None:
    """Issue 17.3: a share that does not decrypt, or does not match its sender's digests, no
    longer ends the recipient's round: it masks without that neighbour and says so with its
    upload; the server drops the neighbour and the others' sum is exact."""
    params, clients, server = _setup(n=6)
    _to_masked_stage(clients, server)
    shares = {d: server.masked_input_request(d).shares for d in clients}
    first = shares["d2"][0]  # from d0: does not decrypt
    shares["d2"] = (_garble(first), *shares["d2"][1:])
    second = shares["d3"][1]  # from d1: decrypts, but its digests were not the sender's
    shares["d3"] = (shares["d3"][0], second.model_copy(update={"key_digest": bytes(32)}), *shares["d3"][2:])
    xs = _inputs(sorted(clients), params.vector_length, params.ring_bits, 5)
    total, _ = _unmask_all(clients, server, xs, shares)
    assert clients["d2"].omitted == [first.sender] and clients["d3"].omitted == [second.sender]
    assert server.accused == {first.sender, second.sender}
    kept = [xs[d] for d in clients if d not in server.accused]
    np.testing.assert_array_equal(total, codec.ring_sum(kept, params.ring_bits))
    assert server.refused == []


def test_a_device_that_sends_garbage_to_everyone_costs_only_itself() -> None:
    params, clients, server = _setup(n=5)
    _to_masked_stage(clients, server)
    shares = {
        d: tuple(_garble(e) if e.sender == "d4" else e for e in server.masked_input_request(d).shares)
        for d in clients
    }
    xs = _inputs(sorted(clients), params.vector_length, params.ring_bits, 6)
    total, _ = _unmask_all(clients, server, xs, shares)
    assert server.accused == {"d4"}
    np.testing.assert_array_equal(
        total, codec.ring_sum([xs[d] for d in ("d0", "d1", "d2", "d3")], params.ring_bits)
    )


def test_omissions_are_checked_where_they_arrive() -> None:
    params, clients, server = _setup(n=5)
    _to_masked_stage(clients, server)
    with pytest.raises(SecAggError, match="never relayed"):
        server.check_omissions("d0", ["d9"])
    server.add_masked_input("d1", np.zeros(params.vector_length, dtype=np.uint32))
    with pytest.raises(SecAggError, match="before inputs"):
        server.record_omissions("d0", ["d1"])


def test_a_readdressed_share_is_not_held() -> None:
    params, clients, server = _setup(n=5)
    _to_masked_stage(clients, server)
    req = server.masked_input_request("d2")
    readdressed = MaskedInputRequest(
        round_id=req.round_id,
        recipient="d3",
        shares=tuple(s.model_copy(update={"recipient": "d3"}) for s in req.shares if s.sender != "d3"),
    )
    x = np.zeros(params.vector_length, dtype=np.uint32)
    with pytest.raises(SecAggError, match="usable shares"):  # none decrypts: too few to mask with
        clients["d3"].masked_input(x, readdressed)


def test_a_lying_reveal_is_left_out_and_the_others_unmask() -> None:
    params, clients, server = _setup(n=6)  # complete graph: degree 5, t = 3
    _to_masked_stage(clients, server)
    xs = _inputs(sorted(clients), params.vector_length, params.ring_bits, 8)
    for d, c in clients.items():
        server.add_masked_input(d, c.masked_input(xs[d], server.masked_input_request(d)))
    req = server.close_masked_input()
    responses = [clients[d].unmask(req.survivors, req.dropped) for d in req.survivors]
    r0 = responses[0]
    s0 = r0.self_mask_shares[1]
    wrong = bytes(65) + bytes([s0.value[-1] ^ 1])
    lie = r0.model_copy(
        update={"self_mask_shares": (r0.self_mask_shares[0], s0.model_copy(update={"value": wrong}))}
    )
    with pytest.raises(SecAggError, match="not given to it"):
        server.check_unmask_response(lie)  # refused where it arrives
    total = server.unmask([lie, *responses[1:]])
    assert server.refused == [r0.sender]
    np.testing.assert_array_equal(total, codec.ring_sum(list(xs.values()), params.ring_bits))


def test_too_many_lying_reveals_fail_loudly() -> None:
    params, clients, server = _setup(n=6)
    _to_masked_stage(clients, server)
    for d, c in clients.items():
        x = np.full(params.vector_length, 3, dtype=np.uint32)
        server.add_masked_input(d, c.masked_input(x, server.masked_input_request(d)))
    req = server.close_masked_input()
    responses = [clients[d].unmask(req.survivors, req.dropped) for d in req.survivors]
    zero = bytes(66)
    liars = [
        r.model_copy(
            update={
                "self_mask_shares": tuple(s.model_copy(update={"value": zero}) for s in r.self_mask_shares)
            }
        )
        for r in responses[:4]
    ]
    with pytest.raises(UnrecoverableError):
        server.unmask([*liars, *responses[4:]])
    assert len(server.refused) == 4


def test_devices_left_with_too_few_sharing_neighbours_are_excluded() -> None:
    devices = [f"d{i:02d}" for i in range(16)]
    params = _params(6, 16, degree=8, threshold=5)
    graph = neighbour_graph(devices, params.graph_seed, 8)
    victim = devices[5]
    # 7 of the victim's 8 neighbours drop before sharing keys: 1 < t - 1 remain
    stops = dict.fromkeys(sorted(graph[victim])[:7], SHARE)
    inputs = _inputs(devices, 6, 16, 9)
    log = RoundLog()
    total = run_round(params, inputs, stops, log=log)
    assert log.server is not None and victim in log.server.excluded
    assert victim not in log.survivors
    np.testing.assert_array_equal(total, codec.ring_sum([inputs[d] for d in log.survivors], params.ring_bits))


def test_server_state_survives_a_restart_mid_round() -> None:
    _, clients, server = _setup(n=7, length=50, bits=20)
    _to_masked_stage(clients, server)
    xs = _inputs(sorted(clients), 50, 20, 11)
    for d in ("d0", "d1", "d2"):
        server.add_masked_input(d, clients[d].masked_input(xs[d], server.masked_input_request(d)))
    blob = server.to_bytes()
    server = SecAggServer.from_bytes(blob)
    for d in ("d3", "d4", "d5"):
        server.add_masked_input(d, clients[d].masked_input(xs[d], server.masked_input_request(d)))
    req = server.close_masked_input()
    assert req.dropped == ("d6",)
    server = SecAggServer.from_bytes(server.to_bytes())
    total = server.unmask([clients[d].unmask(req.survivors, req.dropped) for d in req.survivors])
    expected = codec.ring_sum([xs[d] for d in req.survivors], 20)
    np.testing.assert_array_equal(total, expected)
    np.testing.assert_array_equal(SecAggServer.from_bytes(server.to_bytes()).result(), expected)
    with pytest.raises(SecAggError):
        SecAggServer.from_bytes(blob[:-1])
    with pytest.raises(SecAggError):
        SecAggServer.from_bytes(b"XXXX" + blob[4:])


def _state_parts(blob: bytes) -> tuple[dict[str, object], int]:
    """The JSON of a version-2 state and where its relayed shares start."""
    head = secagg_server._STATE_HEAD
    _, version, n = head.unpack(blob[: head.size])
    assert version == secagg_server.STATE_VERSION == 2
    return json.loads(blob[head.size : head.size + n]), head.size + n


def test_a_version_1_state_is_read_and_written_as_version_2() -> None:
    """Version 1 kept the relayed shares in the state's JSON; a round open across an upgrade
    goes on from such a state."""
    _, clients, server = _setup(n=5, length=8, bits=12)
    _to_masked_stage(clients, server)
    blob = server.to_bytes()
    meta, _ = _state_parts(blob)
    meta["mailbox"] = {
        d: [json.loads(e.model_dump_json()) for e in server.masked_input_request(d).shares]
        for d in sorted(clients)
    }
    text = json.dumps(meta).encode()
    old = secagg_server._STATE_HEAD.pack(b"FKSA", 1, len(text)) + text + blob[-8 * 2 :]  # 8 uint16 words
    restored = SecAggServer.from_bytes(old)
    for d in clients:
        assert restored.masked_input_request(d) == server.masked_input_request(d)
    assert restored.to_bytes() == blob


def test_damaged_relayed_shares_are_refused() -> None:
    """The packed inboxes of a stored state: a wrong length is refused when the state is read,
    a damaged share when its recipient's inbox is first used (nothing is trusted unchecked)."""
    _, clients, server = _setup(n=5, length=8, bits=12)
    _to_masked_stage(clients, server)
    blob = server.to_bytes()
    _, at = _state_parts(blob)
    assert int.from_bytes(blob[at : at + 4], "little") == 5  # five recipients
    k = blob[at + 4]
    first = blob[at + 5 : at + 5 + k].decode()
    size_at = at + 5 + k
    too_long = blob[:size_at] + (1 << 30).to_bytes(4, "little") + blob[size_at + 4 :]
    with pytest.raises(SecAggError, match="truncated"):
        SecAggServer.from_bytes(too_long)
    share_at = size_at + 4 + 2  # past the inbox's share count: the first share's sender length
    bad_sender = blob[:share_at] + bytes([blob[share_at] + 1]) + blob[share_at + 1 :]
    damaged = SecAggServer.from_bytes(bad_sender)
    with pytest.raises(SecAggError, match="malformed relayed shares"):
        damaged.masked_input_request(first)
    others = [d for d in sorted(clients) if d != first]
    assert damaged.masked_input_request(others[0]) == server.masked_input_request(others[0])


def test_invalid_inputs_are_refused() -> None:
    _, clients, server = _setup(n=3, length=4, bits=8)
    _to_masked_stage(clients, server)
    req = server.masked_input_request("d0")
    with pytest.raises(SecAggError, match="values must lie"):
        clients["d0"].masked_input(np.array([0, 1, 2, 256], dtype=np.uint32), req)
    with pytest.raises(SecAggError, match="shape"):
        clients["d0"].masked_input(np.zeros(5, dtype=np.uint32), req)
    with pytest.raises(SecAggError, match="may not send"):
        server.add_masked_input("stranger", np.zeros(4, dtype=np.uint32))


def _masked_vector(x: np.ndarray, bits: int, seed: int) -> np.ndarray:
    devices = [f"d{i}" for i in range(3)]
    params = _params(x.shape[0], bits, round_id=seed)
    log = RoundLog()
    run_round(params, dict.fromkeys(devices, x), log=log)
    return log.masked["d0"]


def _chi_square_bytes(values: np.ndarray, nbytes: int) -> float:
    raw = values.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :nbytes].reshape(-1)
    counts = np.bincount(raw, minlength=256).astype(np.float64)
    expected = raw.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", [32, 16, 8])
def test_masked_vector_is_uniform_and_independent_of_the_input(bits: int) -> None:
    n = 40_000
    structured = (np.arange(n, dtype=np.uint32) % 50) * 3  # few distinct small values
    zeros = np.zeros(n, dtype=np.uint32)
    chi_limit = 341.0  # chi-square, 255 degrees of freedom, p ~ 3e-4
    for x, seed in ((structured, 1), (zeros, 2)):
        y = _masked_vector(x, bits, seed)
        assert y.max() < 1 << bits
        assert _chi_square_bytes(y, bits // 8) < chi_limit
        ones = np.unpackbits(y.astype("<u4").view(np.uint8), bitorder="little")
        per_bit = ones.reshape(-1, 32).mean(axis=0)  # column j: bit j of the value
        # every ring bit is balanced; bits beyond the ring width are zero
        assert np.all(np.abs(per_bit[:bits] - 0.5) < 4 * 0.5 / np.sqrt(n))
        assert np.all(per_bit[bits:] == 0)
        if x is structured:  # a masked vector alone says nothing about x: no correlation
            corr = np.corrcoef(y.astype(np.float64), x.astype(np.float64))[0, 1]
            assert abs(corr) < 4 / np.sqrt(n)
    assert _chi_square_bytes(structured, bits // 8) > 10 * chi_limit  # the test has power


def test_same_input_masks_differently_each_round() -> None:
    x = np.arange(1000, dtype=np.uint32)
    a, b = _masked_vector(x, 32, 1), _masked_vector(x, 32, 2)
    assert np.mean(a == b) < 0.01
    assert not np.array_equal(a, x)


def test_end_to_end_mean_from_float_updates() -> None:
    d, n = 300, 8
    cp = codec.CodecParams(
        clip_norm=10.0, max_clients=n, bits=12, seed=b"s" * 32, weight_cap=4, keep_fraction=1.0
    )
    params = secagg_params_for(cp, d, round_id=3, graph_seed=bytes(32))
    assert (params.vector_length, params.ring_bits) == (513, 15)  # D = 512 kept + weight
    rng = np.random.default_rng(0)
    deltas = {f"d{i}": rng.normal(0, 0.05, d).astype(np.float32) for i in range(n)}
    counts = {f"d{i}": i % 5 + 1 for i in range(n)}
    encoded = {k: codec.encode(v, cp, rng, num_examples=counts[k]).values for k, v in deltas.items()}
    stops = {"d3": MASK}
    total = run_round(params, encoded, stops)
    alive = [k for k in deltas if k != "d3"]
    mean = codec.decode_sum(total, cp, len(alive), d)
    w = np.array([min(counts[k], 4) for k in alive], dtype=np.float64)
    ref = (w[:, None] * np.stack([deltas[k] for k in alive])).sum(0) / w.sum()
    assert np.linalg.norm(mean - ref) < 0.02 * np.linalg.norm(ref)


def test_doomed_round_fails_when_the_inputs_close_not_later() -> None:
    devices = [f"dev{i:02d}" for i in range(20)]
    params = _params(8, 16)
    graph = neighbour_graph(devices, params.graph_seed)
    degree, t = resolve_graph(params, 20)
    victim = devices[3]
    # the victim and degree - t + 1 of its neighbours drop after sharing keys: the victim's
    # key can never get t shares, which the server sees as soon as the inputs are in
    stops = dict.fromkeys(sorted(graph[victim])[: degree - t + 1], MASK)
    stops[victim] = MASK
    log = RoundLog()
    with pytest.raises(UnrecoverableError) as err:
        run_round(params, _inputs(devices, 8, 16, 4), stops, log=log)
    assert log.survivors == []  # raised by close_masked_input, before any share is revealed
    assert err.value.devices[victim] == t - 1


def test_client_retries_are_idempotent_until_the_next_stage() -> None:
    _, clients, server = _setup(n=4)
    c = clients["d0"]
    first = c.advertise_keys()
    assert c.advertise_keys() == first  # lost response: ask again, same keys
    for other in clients.values():
        server.add_advertisement(other.advertise_keys())
    roster = server.close_advertise()
    shares = c.share_keys(roster)
    assert c.share_keys(roster) == shares
    with pytest.raises(SecAggError, match="different roster"):
        c.share_keys(roster.model_copy(update={"threshold": roster.threshold - 1}))
    other = roster.devices[2].model_copy(update={"mask_public_key": bytes(range(32))})
    swapped = (*roster.devices[:2], other, *roster.devices[3:])
    with pytest.raises(SecAggError, match="different roster"):  # any device's key counts
        c.share_keys(roster.model_copy(update={"devices": swapped}))
    assert c.share_keys(type(roster).model_validate_json(roster.model_dump_json())) == shares
    with pytest.raises(StageError):
        c.advertise_keys()
    restored = SecAggClient.from_bytes(c.to_bytes())
    assert restored.share_keys(roster) == shares
    assert restored.stage is Stage.MASKED_INPUT


def test_low_order_public_key_is_refused_by_server_and_clients() -> None:
    _, clients, server = _setup(n=3)
    ads = [c.advertise_keys() for c in clients.values()]
    bad = ads[1].model_copy(update={"cipher_public_key": bytes(32)})
    with pytest.raises(SecAggError, match="low-order"):
        server.add_advertisement(bad)
    # a coordinator that relays it anyway: every client refuses the roster
    roster = ShareKeysRequest(round_id=ads[0].round_id, devices=(ads[0], bad, ads[2]), degree=2, threshold=2)
    for d in ("d0", "d2"):
        with pytest.raises(SecAggError, match="low-order"):
            clients[d].share_keys(roster)


@pytest.mark.parametrize(("degree", "threshold"), [(None, 1), (4, 2), (6, 3), (2, 3)])
def test_thresholds_below_the_floors_are_refused_on_both_sides(degree: int | None, threshold: int) -> None:
    params = _params(4, 8, degree=degree, threshold=threshold)
    with pytest.raises(SecAggError):
        resolve_graph(params, 9)
    if threshold == 1:  # a device refuses such a plan at once
        with pytest.raises(SecAggError, match="below the minimum"):
            SecAggClient("d0", params)


def test_secure_aggregation_needs_three_devices() -> None:
    with pytest.raises(SecAggError, match="at least 3"):
        resolve_graph(_params(4, 8), 2)


def test_a_client_never_masks_without_live_neighbours() -> None:
    """The reproduced t = 1 attack needs a coordinator that relays no shares: the device then
    refuses to mask with fewer than max(t - 1, 1) live neighbours, so its input never goes out
    protected by its self-mask alone."""
    params, clients, server = _setup(n=4)
    _to_masked_stage(clients, server)
    x = np.full(params.vector_length, 7, dtype=np.uint32)
    with pytest.raises(SecAggError, match="completed key sharing"):
        clients["d0"].masked_input(x, ())


def test_server_adds_binary_uploads_in_place() -> None:
    from protocol import wire

    params, clients, server = _setup(n=5, length=3001, bits=13)
    _to_masked_stage(clients, server)
    xs = _inputs(sorted(clients), 3001, 13, 21)
    lh = "ab" * 32
    bodies = {}
    for d, c in clients.items():
        y = c.masked_input(xs[d], server.masked_input_request(d))
        header = wire.UpdateHeader(
            kind=wire.UpdateKind.RING,
            bits=13,
            round_id=params.round_id,
            layout_hash=lh,
            keep_fraction=1.0,
            length=3001,
            dim=3000,
        )
        bodies[d] = wire.pack_update(header, y)
    corrupt = bytearray(bodies["d0"])
    corrupt[-5] ^= 1
    with pytest.raises(wire.ChecksumError):
        server.add_masked_update("d0", bytes(corrupt), layout_hash=lh)
    with pytest.raises(wire.LayoutMismatchError):
        server.add_masked_update("d0", bodies["d0"], layout_hash="cd" * 32)
    assert not server.has_masked_input("d0")
    for d in ("d0", "d1", "d2", "d3"):
        server.add_masked_update(d, bodies[d], layout_hash=lh, dim=3000)
    with pytest.raises(DuplicateInputError):
        server.add_masked_update("d1", bodies["d1"], layout_hash=lh)
    req = server.close_masked_input()
    total = server.unmask([clients[d].unmask(req.survivors, req.dropped) for d in req.survivors])
    np.testing.assert_array_equal(total, codec.ring_sum([xs[d] for d in req.survivors], 13))


def test_client_state_keeps_only_the_neighbourhood_of_the_roster() -> None:
    """The client state holds its neighbours' mask keys and the roster's ids and digest, not
    every device's keys: O(degree) keys, whatever n."""
    params, clients, server = _setup(n=40, length=8)
    _to_masked_stage(clients, server)
    roster = server.roster
    assert roster is not None and roster.degree < 39
    c = clients["d0"]
    state = SecAggClient.from_bytes(c.to_bytes()).to_bytes().decode()
    neighbours = set(
        neighbour_graph([a.device for a in roster.devices], params.graph_seed, params.degree)["d0"]
    )
    for a in roster.devices:
        key = base64.b64encode(a.mask_public_key).decode()
        assert (key in state) == (a.device in neighbours), a.device
        assert base64.b64encode(a.cipher_public_key).decode() not in state
