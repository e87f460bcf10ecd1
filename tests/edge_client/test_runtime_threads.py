"""Several threads of one process using the ExecuTorch runtime at once (as the simulator's devices
and the tests' agents do) all finish, and the runtime's log stays off stderr unless asked for.

Regression test for the deadlock described in :mod:`edge_client.native`. The workload runs in a
fresh child process: the deadlock is in the runtime's threadpool set-up, which happens once per
process, and the stuck thread holds the GIL, so no Python thread of that process (a watchdog,
the main thread's ``join(timeout)``, pytest-timeout's timer) could report it. The child arms
faulthandler's watchdog instead (a C thread that needs no GIL): on a hang it writes every
thread's stack to stderr and exits, and the test fails with those stacks in its message.
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
THREADS, REPETITIONS, STEPS = 6, 5, 3
HANG_SECONDS = 120  # the workload takes about 5 s (3 of them importing torch)
TEXTS = [
    "hello there how are you doing today",
    "see you tomorrow at the station",
    "i am on my way home now",
    "thanks for the lovely dinner last night",
]


def workload(bundle_dir: str, threads: int, repetitions: int, steps: int, hang_seconds: float) -> None:
    """In the child: ``threads`` threads, each ``repetitions`` times (all together, a barrier
    per repetition): set the thread count (1, 2, 1, ...: the pool is rebuilt once per change),
    load ``train.pte``, train ``steps`` steps, unload. Prints a JSON summary on stdout."""
    faulthandler.enable()  # a crash, too, prints every thread's stack
    faulthandler.dump_traceback_later(hang_seconds, exit=True)
    from edge_client.batching import encode_messages, pack_batches
    from edge_client.runtime import OptimizerConfig, Trainer, set_threads
    from edge_client.tokenizer import Tokenizer
    from protocol.bundle import load_bundle

    bundle = load_bundle(Path(bundle_dir))
    spec = bundle.manifest.train
    seqs = encode_messages(Tokenizer(bundle.path(bundle.manifest.tokenizer)), TEXTS, spec.seq_len)
    together = threading.Barrier(threads)
    done: list[int] = []
    errors: list[str] = []

    def device(i: int) -> None:
        try:
            for r in range(repetitions):
                together.wait()
                set_threads(1 + r % 2)
                trainer = Trainer.from_bundle(bundle)
                batches = itertools.cycle(list(pack_batches(seqs, spec.batch_size, spec.seq_len)))
                stats = trainer.train(batches, OptimizerConfig(), max_steps=steps)
                trainer.close()
                if stats.steps != steps:
                    errors.append(f"device {i}, repetition {r}: {stats.steps} steps")
                done.append(i)
        except BaseException as e:
            together.abort()
            errors.append(f"device {i}: {type(e).__name__}: {e}")

    workers = [threading.Thread(target=device, args=(i,), name=f"device-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"runs": len(done), "errors": errors}))


def run_child(bundle_dir: Path, show_logs: bool) -> tuple[dict[str, object], str]:
    env = {k: v for k, v in os.environ.items() if k != "FEDKEYS_NATIVE_LOGS"}
    if show_logs:
        env["FEDKEYS_NATIVE_LOGS"] = "1"
    code = (
        "from tests.edge_client.test_runtime_threads import workload; "
        f"workload({str(bundle_dir)!r}, {THREADS}, {REPETITIONS}, {STEPS}, {HANG_SECONDS})"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=HANG_SECONDS + 60,
        )
    except subprocess.TimeoutExpired as e:  # faulthandler did not even fire: say what we have
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the child hung past faulthandler's watchdog; its stderr:\n{err[-20000:]}")
    if proc.returncode != 0:
        pytest.fail(
            f"the child exited with {proc.returncode} (a hang prints every thread's stack, "
            f"'Timeout (0:02:00)!'); its stderr:\n{proc.stderr[-20000:]}"
        )
    summary: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return summary, proc.stderr


@pytest.mark.parametrize("show_logs", [False, True], ids=["logs-hidden", "logs-shown"])
def test_threads_of_one_process_load_and_train(tiny_bundle_dir: Path, show_logs: bool) -> None:
    summary, stderr = run_child(tiny_bundle_dir, show_logs)
    assert summary["errors"] == []
    assert summary["runs"] == THREADS * REPETITIONS
    native = [line for line in stderr.splitlines() if "cpuinfo_utils.cpp" in line or "threadpool.cpp" in line]
    if not show_logs:
        assert native == [], "the runtime's log reached stderr"
    else:
        # the lines still come out when asked for, and the pool was rebuilt once per change of
        # the count (1, 2, 1, 2, 1), not once per device and repetition
        assert any("cpuinfo_utils.cpp" in line for line in native)
        resets = [line for line in native if "Resetting threadpool" in line]
        assert len(resets) == REPETITIONS, resets


def test_a_failed_load_says_why_in_the_log_not_on_stderr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from edge_client.runtime import ProgramModel

    bad = tmp_path / "predict.pte"
    bad.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="edge_client.native"), pytest.raises(RuntimeError):
        ProgramModel(bad, max_seq_len=32, beam_batch=4)
    assert any("mmap_data_loader" in r.getMessage() for r in caplog.records), caplog.text
    assert "mmap_data_loader" not in capfd.readouterr().err


@pytest.mark.parametrize("show_logs", [False, True], ids=["logs-hidden", "logs-shown"])
def test_import_chatter_of_torch_and_torchao_stays_off_the_console(show_logs: bool) -> None:
    """Every export printed torchao's "Failed to load ..._C_mxfp8..." and torch's "W... _pytree"
    deprecation lines, from the command and from its spawned export child: torch resets its
    logger's level when it is imported, after the command had raised it. quiet_python_logs
    (called by every fedkeys command but the coordinator, and by each spawned child) keeps
    them off unless FEDKEYS_NATIVE_LOGS=1."""
    import os
    import subprocess
    import sys

    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from edge_client.native import quiet_python_logs; quiet_python_logs()\n"
        "import executorch.exir, torchao  # noqa\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEDKEYS_NATIVE_LOGS"}
    if show_logs:
        env["FEDKEYS_NATIVE_LOGS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    chatter = [line for line in proc.stderr.splitlines() if "Failed to load" in line or "_pytree" in line]
    assert (chatter != []) == show_logs, proc.stderr[-5000:]
