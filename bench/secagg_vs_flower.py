"""Secure aggregation benchmark: fedkeys' protocol/ against Flower 1.42's SecAgg+ (issue 3).

Run from a fresh clone:  .venv/bin/python bench/secagg_vs_flower.py

What is measured, for n clients each holding a d-float update (default d = 1,000,000):

* **ours**: one full round of protocol.secagg with protocol.codec: every client's key
  agreement, Shamir sharing and share encryption, encoding, masking and bit-packing; every
  message serialised to its wire form (JSON models, binary update bodies) and parsed by the
  server-side code; 10% of the clients drop after sharing keys; the server's running sum,
  share reconstruction, mask removal and decoding to the mean float vector. Client work runs
  in a process pool of os.cpu_count() workers; the server runs in the main process. Binary
  uploads travel through a fixed set of shared-memory segments lent to one upload at a time
  (the simulation's transport, as Flower's Ray object store); JSON messages through the
  pool's pipes.
* **Flower SecAgg+**: one round of Flower's SecAggPlusWorkflow (num_shares = our degree + 1,
  about 2 log2 n + 1; reconstruction_threshold 0.5; its default clipping 8.0, quantization
  range 2**22, modulus 2**32) in its simulation engine (Ray, num_cpus = cores, 1 CPU per
  client), timed around the fit round inside the ServerApp; **Flower FedAvg**: the same
  round without secure aggregation. Flower is installed into .cache/bench-flower-venv by this
  script (never a project dependency).
* **PRG floor**: bytes of mask keystream that all clients and the server must generate, divided
  by the AES-128-CTR keystream rate measured here on one core (per CPU second, the faster of
  OpenSSL's CTR and GCM code paths, as the masks use), divided by the cores. "CPU / PRG CPU"
  is the load-independent form: all CPU seconds of the round over the keystream's CPU
  seconds on one core.
* Per-client CPU milliseconds by stage and, for the masked-input stage, by step (state
  parsing, generating the update, encode, mask, pack), and the server's per-upload cost.
* Codec throughput (encode, decode) on one core.

Correctness of every measured round is checked after timing (the unmasked sum must equal the
exact sum of the survivors' encoded vectors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOWER_SPEC = "flwr[simulation]==1.42.0"
FLOWER_VENV = ROOT / ".cache" / "bench-flower-venv"
DROP_FRACTION = 0.10

# Configurations of our codec, all measured with the same protocol.
CLIP_NORM = 0.3  # times sqrt(d): the updates below have L2 norm sqrt(d / 12) = 0.289 sqrt(d)

# "coord_range": the non-rotated configs quantize [-8, 8] per coordinate, Flower's
# clipping_range (range_factor is derived from it).
CONFIGS: dict[str, dict[str, Any]] = {
    # Flower-like: no rotation, no sparsification, 16-bit quantization.
    "p=1 b=16": {"rotate": False, "keep_fraction": 1.0, "bits": 16, "coord_range": 8.0},
    # Flower's own precision: it quantizes [-8, 8] to 2**22 levels (in a 32-bit ring).
    "p=1 b=22": {"rotate": False, "keep_fraction": 1.0, "bits": 22, "coord_range": 8.0},
    # Our default: randomised Hadamard rotation, 8 bits, every coordinate.
    "rot p=1 b=8": {"rotate": True, "keep_fraction": 1.0, "bits": 8, "range_factor": 4.0},
    # Compressed: rotation, a round-shared quarter of the coordinates, 8 bits.
    "rot p=0.25 b=8": {"rotate": True, "keep_fraction": 0.25, "bits": 8, "range_factor": 4.0},
}


def codec_params(config: dict[str, Any], n: int, d: int, seed: int) -> Any:
    from protocol.codec import CodecParams

    cfg = dict(config)
    clip = CLIP_NORM * math.sqrt(d)
    if "coord_range" in cfg:  # R = range_factor * C / sqrt(D), D = d without rotation
        cfg["range_factor"] = cfg.pop("coord_range") * math.sqrt(d) / clip
    return CodecParams(
        clip_norm=clip, max_clients=n, seed=seed, **{"keep_fraction": 1.0, "weight_cap": 1, **cfg}
    )


def client_update(cid: int, d: int) -> Any:
    """The update a simulated client returns (identical for ours and Flower)."""
    import numpy as np

    x = np.random.default_rng(cid).random(d, dtype=np.float32)
    x -= np.float32(0.5)
    return x


# ======================================================================================
# Flower (runs inside the bench venv: stdlib + numpy + flwr only)
# ======================================================================================


def flower_worker(n: int, d: int, mode: str, out_path: str) -> None:
    """One Flower round in simulation; writes {"fit_s": ..., "total_s": ...} to out_path."""
    import logging

    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    degree = min(n - 1, 2 * math.ceil(math.log2(n)))

    class BenchClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, cid: int) -> None:
            self.cid = cid

        def fit(self, parameters: Any, config: Any) -> Any:
            return [client_update(self.cid, d)], 1, {}

    def client_fn(context: Context) -> Any:
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    mods = [secaggplus_mod] if mode == "secagg" else []
    client_app = ClientApp(client_fn=client_fn, mods=mods)
    server_app = ServerApp()
    fit = (
        SecAggPlusWorkflow(num_shares=degree + 1, reconstruction_threshold=0.5)
        if mode == "secagg"
        else default_fit_workflow
    )
    result: dict[str, Any] = {"num_shares": degree + 1 if mode == "secagg" else None}

    def timed_fit(grid: Grid, context: Context) -> None:
        t0 = time.perf_counter()
        fit(grid, context)
        result["fit_s"] = time.perf_counter() - t0
        Path(out_path).write_text(json.dumps(result))

    @server_app.main()  # type: ignore[misc]
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(d, dtype=np.float32)]),
        )
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, ctx)

    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1},
        },
    )
    total = time.perf_counter() - t0
    data = json.loads(Path(out_path).read_text()) if Path(out_path).exists() else {}
    data["total_s"] = total
    Path(out_path).write_text(json.dumps(data))


def ensure_flower_venv() -> tuple[Path | None, str]:
    """Create the bench venv with Flower if needed; (python path, "") or (None, error)."""
    py = FLOWER_VENV / "bin" / "python"
    check = [str(py), "-c", "import flwr, ray; print(flwr.__version__)"]
    if py.exists():
        ok = subprocess.run(check, capture_output=True, text=True, check=False)
        if ok.returncode == 0 and ok.stdout.strip() == "1.42.0":
            return py, ""
    FLOWER_VENV.parent.mkdir(parents=True, exist_ok=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(FLOWER_VENV)],
        [str(py), "-m", "pip", "install", "-q", FLOWER_SPEC],
    ]
    for cmd in steps:
        print(f"$ {' '.join(cmd)}", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return None, f"{' '.join(cmd)} failed: {(r.stderr or r.stdout)[-2000:]}"
    ok = subprocess.run(check, capture_output=True, text=True, check=False)
    if ok.returncode != 0:
        return None, f"flwr import failed after install: {ok.stderr[-2000:]}"
    return py, ""


def run_flower(py: Path, n: int, d: int, mode: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [str(py), __file__, "--flower-worker", mode, str(n), str(d), str(out)]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if r.returncode != 0 or not out.exists():
            return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}"}
        data: dict[str, Any] = json.loads(out.read_text())
        if "fit_s" not in data:
            return {"error": "the fit round did not finish", **data}
        data["wall_s"] = wall
        return data


# ======================================================================================
# Ours (runs in the project venv)
# ======================================================================================

_W: dict[str, Any] = {}  # per-worker cache of parsed round parameters


def _params(codec_json: str, secagg_json: str) -> tuple[Any, Any]:
    from protocol.codec import CodecParams
    from protocol.wire import SecAggParams

    key = codec_json + secagg_json
    if _W.get("key") != key:
        _W["key"] = key
        _W["params"] = (
            CodecParams.model_validate_json(codec_json),
            SecAggParams.model_validate_json(secagg_json),
        )
    return _W["params"]  # type: ignore[no-any-return]


def _task(job: tuple[Any, Any]) -> tuple[float, Any]:
    """Run one client step in a worker; returns (CPU seconds, result)."""
    fn, args = job
    t0 = time.process_time()
    out = fn(args)
    return time.process_time() - t0, out


def _w_advertise(args: tuple[str, str, str]) -> tuple[str, bytes, str]:
    from protocol.secagg import SecAggClient

    device, codec_json, secagg_json = args
    _, sp = _params(codec_json, secagg_json)
    client = SecAggClient(device, sp)
    msg = client.advertise_keys().model_dump_json()
    return device, client.to_bytes(), msg


def _w_share(args: tuple[bytes, str, str, str]) -> tuple[str, bytes, str]:
    from protocol.secagg import SecAggClient
    from protocol.wire import ShareKeysRequest

    state, roster_json, codec_json, secagg_json = args
    _params(codec_json, secagg_json)
    client = SecAggClient.from_bytes(state)
    msg = client.share_keys(ShareKeysRequest.model_validate_json(roster_json))
    return client.device, client.to_bytes(), msg.model_dump_json()


def _ring_header(sp: Any, cp: Any, layout_hash: str, d: int) -> Any:
    """The wire header of a client's masked upload in this round."""
    from protocol import wire

    return wire.UpdateHeader(
        kind=wire.UpdateKind.RING,
        bits=sp.ring_bits,
        round_id=sp.round_id,
        layout_hash=layout_hash,
        keep_fraction=cp.keep_fraction,
        length=sp.vector_length,
        dim=d,
    )


def _segment(name: str) -> Any:
    """A transport segment attached once per worker and kept mapped (see our_round)."""
    from multiprocessing import resource_tracker, shared_memory

    cache: dict[str, Any] = _W.setdefault("segments", {})
    if name not in cache:
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        cache[name] = shm
    return cache[name]


def _w_masked(
    args: tuple[bytes, str, int, int, str, str, str, str],
) -> tuple[str, bytes, str, int, dict[str, float]]:
    """Encode, mask and pack one client's update. The binary upload travels to the server
    process through shared memory (the simulation's transport, like Flower's Ray object
    store; a pipe would add two copies of every body): it is packed straight into a
    transport segment lent by the server (wire.pack_update_into, the same bytes as
    wire.pack_update). Returns (device, state, segment name, body length, CPU seconds per
    step)."""
    import numpy as np

    from protocol import codec, wire
    from protocol.secagg import SecAggClient

    state, request_json, cid, d, layout_hash, codec_json, secagg_json, segment = args
    cp, sp = _params(codec_json, secagg_json)
    steps: dict[str, float] = {}
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.process_time()
    client = SecAggClient.from_bytes(state)
    request = wire.MaskedInputRequest.model_validate_json(request_json)
    t1 = time.process_time()
    delta = client_update(cid, d)
    t2 = time.process_time()
    encoded = codec.encode(delta, cp, np.random.default_rng(1_000_000 + cid))
    t3 = time.process_time()
    masked = client.masked_input(encoded.values, request, overwrite=True)
    t4 = time.process_time()
    steps.update(state=t1 - t0, update=t2 - t1, encode=t3 - t2, mask=t4 - t3)
    header = _ring_header(sp, cp, layout_hash, d)
    size = wire.pack_update_into(header, masked, _segment(segment).buf)
    t5 = time.process_time()
    steps["pack"] = t5 - t4
    out_state = client.to_bytes()
    steps["state"] += time.process_time() - t5
    steps["page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return client.device, out_state, segment, size, steps


def _w_unmask(args: tuple[bytes, str, str, str]) -> str:
    from protocol.secagg import SecAggClient
    from protocol.wire import UnmaskRequest

    state, request_json, codec_json, secagg_json = args
    _params(codec_json, secagg_json)
    client = SecAggClient.from_bytes(state)
    req = UnmaskRequest.model_validate_json(request_json)
    return client.unmask(req.survivors, req.dropped).model_dump_json()


def our_round(pool: Any, n: int, d: int, config: dict[str, Any], seed: int) -> dict[str, Any]:
    """One timed round; returns timings, byte counts and the mask-keystream volume."""
    from multiprocessing import shared_memory

    import numpy as np

    from protocol import codec, wire
    from protocol.layout import Layout
    from protocol.secagg import SecAggServer, neighbour_graph, resolve_graph, secagg_params_for
    from protocol.secagg.crypto import ring_dtype

    cp = codec_params(config, n, d, seed)
    sp = secagg_params_for(cp, d, round_id=seed, graph_seed=seed.to_bytes(32, "big"))
    layout_hash = Layout.from_shapes({"update": (d,)}).hash()
    cj, sj = cp.model_dump_json(), sp.model_dump_json()
    devices = [f"dev{i:04d}" for i in range(n)]
    cid_of = {dev: i for i, dev in enumerate(devices)}
    rng = np.random.default_rng(seed)
    stage_s: dict[str, float] = {}
    upload: dict[str, int] = dict.fromkeys(devices, 0)

    t_start = time.perf_counter()
    server = SecAggServer(sp)
    t0 = time.perf_counter()
    states: dict[str, bytes] = {}
    client_cpu = 0.0
    stage_cpu = dict.fromkeys(("advertise", "share_keys", "masked_input", "unmask"), 0.0)
    step_cpu: dict[str, float] = {}
    server_add_cpu = 0.0
    cpu0 = time.process_time()
    jobs_a = [(_w_advertise, (dv, cj, sj)) for dv in devices]
    for cpu, (dev, state, msg) in pool.imap_unordered(_task, jobs_a):
        client_cpu += cpu
        stage_cpu["advertise"] += cpu
        states[dev] = state
        upload[dev] += len(msg)
        server.add_advertisement(wire.AdvertiseKeys.model_validate_json(msg))
    roster_json = server.close_advertise().model_dump_json()
    stage_s["advertise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    jobs = [(_w_share, (states[dv], roster_json, cj, sj)) for dv in devices]
    for cpu, (dev, state, msg) in pool.imap_unordered(_task, jobs):
        client_cpu += cpu
        stage_cpu["share_keys"] += cpu
        states[dev] = state
        upload[dev] += len(msg)
        server.add_share_keys(wire.ShareKeys.model_validate_json(msg))
    active = server.close_share_keys()
    stage_s["share_keys"] = time.perf_counter() - t0

    dropped = set(rng.choice(active, size=round(DROP_FRACTION * len(active)), replace=False))
    t0 = time.perf_counter()
    # Transport: a fixed set of shared-memory segments, each lent to one upload at a time and
    # returned once the server has added it (created inside the timed round; workers keep
    # them mapped, so each page is faulted in once per process, not once per upload).
    size = wire.update_size(_ring_header(sp, cp, layout_hash, d))
    segments = {}
    free: queue.Queue[str] = queue.Queue()
    for _ in range(2 * (os.cpu_count() or 1) + 2):
        shm = shared_memory.SharedMemory(create=True, size=size)
        segments[shm.name] = shm
        free.put(shm.name)

    def jobs_m() -> Any:  # consumed by the pool's task thread: waits for a free segment
        for dv in active:
            if dv not in dropped:
                request = server.masked_input_request(dv).model_dump_json()
                args = (states[dv], request, cid_of[dv], d, layout_hash, cj, sj, free.get())
                yield (_w_masked, args)

    body_bytes = 0
    try:
        for cpu, (dev, state, name, size, steps) in pool.imap_unordered(_task, jobs_m()):
            client_cpu += cpu
            stage_cpu["masked_input"] += cpu
            for k, v in steps.items():
                step_cpu[k] = step_cpu.get(k, 0.0) + v
            states[dev] = state
            upload[dev] += size
            body_bytes = size
            c0 = time.process_time()
            view = segments[name].buf
            assert view is not None
            server.add_masked_update(dev, view[:size], layout_hash=layout_hash, dim=d)
            server_add_cpu += time.process_time() - c0
            free.put(name)
    finally:
        for shm in segments.values():
            shm.close()
            shm.unlink()
    unmask_json = server.close_masked_input().model_dump_json()
    stage_s["masked_input"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    survivors = server.survivors
    jobs_u = [(_w_unmask, (states[dv], unmask_json, cj, sj)) for dv in survivors]
    for dv, (cpu, msg) in zip(survivors, pool.imap(_task, jobs_u), strict=True):
        client_cpu += cpu
        stage_cpu["unmask"] += cpu
        upload[dv] += len(msg)
        server.add_unmask_response(wire.UnmaskResponse.model_validate_json(msg))
    c0 = time.process_time()
    total = server.unmask()
    server_unmask_cpu = time.process_time() - c0
    stage_s["unmask"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    mean = codec.decode_sum(total, cp, len(survivors), d)
    stage_s["decode"] = time.perf_counter() - t0
    elapsed = time.perf_counter() - t_start
    server_cpu = time.process_time() - cpu0

    # ---- after timing: correctness and accounting ----
    expected = codec.ring_sum(
        [
            codec.encode(
                client_update(cid_of[dv], d), cp, np.random.default_rng(1_000_000 + cid_of[dv])
            ).values
            for dv in survivors
        ],
        sp.ring_bits,
    )
    exact = bool(np.array_equal(total, expected))
    ref = np.mean([client_update(cid_of[dv], d) for dv in survivors], axis=0)
    rel_err = float(np.linalg.norm(mean - ref) / np.linalg.norm(ref))
    degree, threshold = resolve_graph(sp, n)
    graph = neighbour_graph(devices, sp.graph_seed, degree)
    u2, u3 = set(active), set(survivors)
    word = ring_dtype(sp.ring_bits).itemsize
    client_streams = sum(1 + len(graph[u] & u2) for u in u3)
    server_streams = len(u3) + sum(len(graph[u] & u3) for u in u2 - u3)
    mask_bytes = (client_streams + server_streams) * sp.vector_length * word
    alive_uploads = [upload[dv] for dv in survivors]
    return {
        "time_s": elapsed,
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
        "client_stage_cpu_s": stage_cpu,
        "masked_step_cpu_s": step_cpu,
        "server_add_cpu_s": server_add_cpu,
        "server_unmask_cpu_s": server_unmask_cpu,
        "stages_s": stage_s,
        "exact": exact,
        "rel_err": rel_err,
        "ring_bits": sp.ring_bits,
        "degree": degree,
        "threshold": threshold,
        "survivors": len(survivors),
        "dropped": len(dropped),
        "masked_body_bytes": body_bytes,
        "client_upload_bytes": int(np.mean(alive_uploads)),
        "dense_bytes": 4 * d,
        "mask_bytes": mask_bytes,
    }


def measure_prg_rate(total_bytes: int = 1 << 30) -> dict[str, float]:
    """Keystream rates on one core (bytes per CPU second, best of 3): AES-256-CTR through
    OpenSSL's CTR mode ("aes256_ctr") and through its GCM kernel ("aes256_gcm": the same
    keystream from counter block 2, see protocol.keystream.Keystream), AES-128 the
    same two ways, and ChaCha20. "aes128" is the faster AES-128 path: the PRG the masks use
    and the floor's rate (until 2026-12-01 the masks used AES-256: "aes256")."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    out = {}
    chunk = 1 << 18
    zeros, buf = bytes(chunk), bytearray(chunk + 16)
    k32, k16 = bytes(range(32)), bytes(range(16))
    ciphers: dict[str, Any] = {
        "aes256_ctr": lambda: Cipher(algorithms.AES(k32), modes.CTR(bytes(16))),
        "aes256_gcm": lambda: Cipher(algorithms.AES(k32), modes.GCM(bytes(12))),
        "aes128_ctr": lambda: Cipher(algorithms.AES(k16), modes.CTR(bytes(16))),
        "aes128_gcm": lambda: Cipher(algorithms.AES(k16), modes.GCM(bytes(12))),
        "chacha20": lambda: Cipher(algorithms.ChaCha20(k32, bytes(16)), None),
    }
    for name, make in ciphers.items():
        enc = make().encryptor()
        best = math.inf
        for _ in range(3):
            t0 = time.process_time()
            for _ in range(total_bytes // chunk // 3):
                enc.update_into(zeros, buf)
            best = min(best, time.process_time() - t0)
        out[name] = (total_bytes // chunk // 3) * chunk / best
    out["aes256"] = max(out["aes256_ctr"], out["aes256_gcm"])
    out["aes128"] = max(out["aes128_ctr"], out["aes128_gcm"])
    return out


def codec_throughput(d: int, config: dict[str, Any]) -> dict[str, float]:
    """Encode and decode rates in MB/s of float32 input, one core (best of 5)."""
    import numpy as np

    from protocol import codec

    cp = codec_params(config, 100, d, 1)
    x = client_update(0, d)
    rng = np.random.default_rng(0)
    enc = codec.encode(x, cp, rng)  # warm caches (subset, signs)
    t_enc = t_dec = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        enc = codec.encode(x, cp, rng)
        t_enc = min(t_enc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        codec.decode_sum(enc.values, cp, 1, d)
        t_dec = min(t_dec, time.perf_counter() - t0)
    mb = 4 * d / 1e6
    return {"encode_MBps": mb / t_enc, "decode_MBps": mb / t_dec}


def _loadavg() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--flower-n", type=int, nargs="*", default=[50, 100, 200])
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--flower-timeout", type=float, default=1800.0)
    ap.add_argument("--json", type=Path, help="also write all results here")
    ap.add_argument("--report", type=Path, help="only print the tables of a saved --json run")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        print(report(saved, saved.get("d", args.d)))
        return

    import multiprocessing as mp

    cores = os.cpu_count() or 1
    print(f"# secagg_vs_flower  {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {platform.processor() or platform.machine()}, {cores} cores, ", end="")
    print(f"python {platform.python_version()}, load {_loadavg():.2f}")
    prg = measure_prg_rate()
    print("# keystream GB/s per CPU second: " + prg_line(prg))

    results: dict[str, Any] = {"cores": cores, "d": args.d, "prg": prg, "ours": {}, "flower": {}}
    for name in args.configs:
        results.setdefault("codec", {})[name] = codec_throughput(args.d, CONFIGS[name])

    # Import everything before forking so that the workers start warm.
    import protocol.codec
    import protocol.secagg
    import protocol.wire  # noqa: F401

    ctx = mp.get_context("fork")
    with ctx.Pool(cores) as pool:
        for name in args.configs:
            for n in args.n:
                load = _loadavg()
                r = our_round(pool, n, args.d, CONFIGS[name], seed=1000 + n)
                r["load_before"] = load
                floor = r["mask_bytes"] / prg["aes128"] / cores
                r["floor_s"] = floor
                results["ours"][f"{name}|{n}"] = r
                print(
                    f"ours  {name:>15} n={n:4d}: {r['time_s']:.2f} s  floor {floor:.2f} s  "
                    f"exact={r['exact']}  k={r['ring_bits']}  cpu clients "
                    f"{r['client_cpu_s']:.2f} server {r['server_cpu_s']:.2f}  stages "
                    + " ".join(f"{k}={v:.2f}" for k, v in r["stages_s"].items()),
                    flush=True,
                )
                print("      " + per_client_line(r, n), flush=True)

    flower_py: Path | None = None
    if not args.no_flower and args.flower_n:
        flower_py, err = ensure_flower_venv()
        if flower_py is None:
            results["flower_error"] = err
            print(f"# Flower unavailable: {err}")
    if flower_py is not None:
        for n in args.flower_n:
            for mode in ("secagg", "fedavg"):
                load = _loadavg()
                r = run_flower(flower_py, n, args.d, mode, args.flower_timeout)
                r["load_before"] = load
                results["flower"][f"{mode}|{n}"] = r
                shown = f"{r['fit_s']:.2f} s" if "fit_s" in r else r.get("error", "?")[:300]
                print(f"flower {mode:>6} n={n:4d}: {shown}", flush=True)

    print()
    print(report(results, args.d))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


def prg_line(prg: dict[str, float]) -> str:
    names = ("aes256_ctr", "aes256_gcm", "aes128_ctr", "aes128_gcm", "chacha20")
    return ", ".join(f"{k} {prg[k] / 1e9:.2f}" for k in names if k in prg)


def per_client_line(r: dict[str, Any], n: int) -> str:
    """CPU milliseconds per client (stage-3 steps per surviving client) and on the server."""
    surv = r["survivors"]
    st = r["client_stage_cpu_s"]
    steps = r["masked_step_cpu_s"]
    parts = [f"{k} {1e3 * st[k] / n:.1f}" for k in ("advertise", "share_keys")]
    parts.append(f"masked_input {1e3 * st['masked_input'] / surv:.1f} (")
    parts[-1] += ", ".join(f"{k} {1e3 * v / surv:.1f}" for k, v in steps.items() if k != "page_faults")
    parts[-1] += f"; {steps.get('page_faults', 0) / surv:.0f} page faults)"
    parts.append(f"unmask {1e3 * st['unmask'] / surv:.1f}")
    server = (
        f"server: verify+add {1e3 * r['server_add_cpu_s'] / surv:.1f} per upload, "
        f"unmask {1e3 * r['server_unmask_cpu_s']:.0f} total"
    )
    return "CPU ms per client: " + "; ".join(parts) + " | " + server


def report(results: dict[str, Any], d: int) -> str:
    """Markdown tables of one run."""
    cores = results["cores"]
    lines = [
        f"d = {d:,}, {cores} cores; keystream rate on one core, GB per CPU second: "
        f"{prg_line(results['prg'])}. The masks' PRG and the floor: AES-128-CTR at "
        f"{results['prg']['aes128'] / 1e9:.2f} GB/s.",
        "",
        "| config | n | k bits | ours (s) | Flower SecAgg+ (s) | Flower FedAvg (s) "
        "| Flower SecAgg+ / ours | masked upload / client | + JSON msgs | dense float32 "
        "| PRG floor (s) | ours / floor | CPU clients + server (s) | CPU / PRG CPU "
        "| exact sum | mean rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results["ours"].items():
        name, n_str = key.split("|")
        fs = results["flower"].get(f"secagg|{n_str}", {})
        ff = results["flower"].get(f"fedavg|{n_str}", {})
        fsec = fs.get("fit_s")
        ffed = ff.get("fit_s")
        ratio = f"{fsec / r['time_s']:.1f}x" if fsec else "-"
        lines.append(
            f"| {name} | {n_str} | {r['ring_bits']} | {r['time_s']:.2f} "
            f"| {f'{fsec:.2f}' if fsec else '-'} | {f'{ffed:.2f}' if ffed else '-'} | {ratio} "
            f"| {r['masked_body_bytes'] / 1e6:.2f} MB "
            f"({r['masked_body_bytes'] / r['dense_bytes']:.3f}x) "
            f"| {(r['client_upload_bytes'] - r['masked_body_bytes']) / 1e3:.1f} kB "
            f"| {r['dense_bytes'] / 1e6:.2f} MB | {r['floor_s']:.2f} "
            f"| {r['time_s'] / r['floor_s']:.1f}x "
            f"| {r['client_cpu_s']:.2f} + {r['server_cpu_s']:.2f} "
            f"| {(r['client_cpu_s'] + r['server_cpu_s']) / (r['floor_s'] * cores):.1f}x "
            f"| {r['exact']} "
            f"| {r['rel_err']:.1e} |"
        )
    lines += ["", "Per round (CPU ms per client; CPU / keystream CPU also at the AES-128 CTR-mode"]
    lines += ["rate, the issue's floor, whichever path is faster here; load average before the round):", ""]
    prg = results["prg"]
    for key, r in results["ours"].items():
        name, n_str = key.split("|")
        if "client_stage_cpu_s" not in r:
            continue
        ctr = (r["client_cpu_s"] + r["server_cpu_s"]) / (
            r["mask_bytes"] / prg.get("aes128_ctr", prg["aes128"])
        )
        load = r.get("load_before")
        lines.append(
            f"* {name}, n={n_str}: {per_client_line(r, int(n_str))}; CPU / CTR-rate keystream "
            f"{ctr:.1f}x" + (f"; load {load:.2f}" if load is not None else "")
        )
    lines += ["", "| config | encode MB/s | decode MB/s |", "|---|---|---|"]
    for name, c in results.get("codec", {}).items():
        lines.append(f"| {name} | {c['encode_MBps']:.0f} | {c['decode_MBps']:.0f} |")
    if results["flower"]:
        lines += ["", "Flower wall time per run including simulation start-up (s): "]
        lines.append(
            ", ".join(f"{k}: {v['wall_s']:.1f}" for k, v in results["flower"].items() if "wall_s" in v)
        )
        lines.append(
            "Load average before each Flower run: "
            + ", ".join(
                f"{k}: {v['load_before']:.2f}" for k, v in results["flower"].items() if "load_before" in v
            )
        )
    if "flower_error" in results:
        lines += ["", f"Flower could not run: {results['flower_error']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--flower-worker":
        flower_worker(int(sys.argv[3]), int(sys.argv[4]), sys.argv[2], sys.argv[5])
    else:
        # one BLAS thread per process: the pool already uses every core
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        sys.path.insert(0, str(ROOT))
        main()
