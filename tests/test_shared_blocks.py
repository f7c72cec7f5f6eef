"""The two-thread block loop (``convert.BlockLine``): order, statistics, bounds, failures.

The loop is driven here with fake read / quantize / emit functions whose timing is random, so
that either thread may be the slow one; what must hold whatever the timing: blocks are emitted
in order, statistics are merged in block order (the same float sums every run), at most
``HELD_BLOCKS`` workspaces are taken, the first failing block in order is the one raised, every
workspace goes back and the helper's loop has stopped.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from monoquant.convert import HELD_BLOCKS, BlockLine, TensorBlocks
from monoquant.numerics import ErrorStats
from monoquant.overlap import BlockQueue, KernelHelper, WorkspacePool


def _shared_blocks(rows, br, read, pool, quantize, emit, stats, helper):
    """One tensor's blocks through a line of their own, every one handed over on return, as
    ``jobs`` drives a line (on failure: ``abort``, every workspace back, the helper free)."""
    line = BlockLine(pool, helper)
    try:
        line.feed(rows, br, read, quantize, TensorBlocks(emit, stats))
        line.drain()
    except BaseException:
        line.abort()
        raise


class CountingPool(WorkspacePool):
    """A pool that records the most workspaces out at once."""

    def __init__(self, size: int):
        super().__init__(size)
        self.out = 0
        self.most = 0
        self._lock = threading.Lock()

    def acquire(self):
        ws = super().acquire()
        with self._lock:
            self.out += 1
            self.most = max(self.most, self.out)
        return ws

    def release(self, ws):
        with self._lock:
            self.out -= 1
        super().release(ws)


def _run(n_blocks, *, seed, fail=(), slow_main=0.0, pool_size=HELD_BLOCKS + 2):
    """Run the loop over ``n_blocks`` one-row blocks; returns (emitted, stats, threads, pool)."""
    rng = random.Random(seed)
    delays = [rng.random() * 0.004 for _ in range(n_blocks)]
    pool = CountingPool(pool_size)
    helper = KernelHelper()
    emitted: list[int] = []
    threads: dict[int, str] = {}
    main = threading.get_ident()

    def read(a, b, ws):
        return torch.tensor([float(a)])

    def quantize(x, ws, st):
        a = int(x[0])
        on_main = threading.get_ident() == main
        threads[a] = "main" if on_main else "helper"
        time.sleep(delays[a] + (slow_main if on_main else 0.0))
        if a in fail:
            raise ValueError(f"block {a}")
        if st is not None:  # sums that depend on the order they are added in
            st.add_sums(1, 0.1 * (a + 1) ** 0.5, 1e-7 * (a + 3) ** 1.5, float(a))
        return {"": x}

    def emit(a, b, ws, res):
        emitted.append(a)
        pool.release(ws)

    stats = ErrorStats()
    try:
        _shared_blocks(n_blocks, 1, read, pool, quantize, emit, stats, helper)
    finally:
        helper.shutdown()
    return emitted, stats, threads, pool


@pytest.mark.parametrize("seed", range(4))
def test_blocks_are_emitted_in_order_with_the_same_statistics_whatever_the_timing(seed):
    emitted, stats, threads, pool = _run(23, seed=seed)
    assert emitted == list(range(23))
    assert pool.out == 0 and pool._free.qsize() == pool.size
    assert pool.most <= HELD_BLOCKS
    # the block-order merge of per-block sums, bit for bit
    want = ErrorStats()
    for a in range(23):
        one = ErrorStats()
        one.add_sums(1, 0.1 * (a + 1) ** 0.5, 1e-7 * (a + 3) ** 1.5, float(a))
        want.merge(one)
    assert (stats.numel, stats.sum_sq, stats.err_sq, stats.max_abs_err) == (
        want.numel,
        want.sum_sq,
        want.err_sq,
        want.max_abs_err,
    )
    assert set(threads.values()) == {"main", "helper"}  # both threads took blocks


def test_the_helper_takes_the_blocks_a_slow_thread_leaves():
    """With this thread slowed down, the helper does not wait for it: it computes most blocks
    (strict alternation would give it half)."""
    emitted, _, threads, _ = _run(24, seed=7, slow_main=0.03)
    assert emitted == list(range(24))
    assert sum(1 for t in threads.values() if t == "helper") >= 16


@pytest.mark.parametrize("fail", [(0,), (1,), (5, 9), (22,)])
@pytest.mark.parametrize("seed", range(3))
def test_the_first_failing_block_in_order_is_raised_and_every_workspace_goes_back(fail, seed):
    """Whichever thread computes it and whenever a later block fails: the blocks before the
    first failing one are emitted, none after it, its error is raised, every workspace is back,
    and the helper goes on with the next tensor."""
    delays = [random.Random(seed * 100 + a).random() * 0.004 for a in range(23)]
    pool = CountingPool(HELD_BLOCKS + 2)
    helper = KernelHelper()
    got: list[int] = []

    failing = set(fail)

    def quantize(x, ws, st):
        a = int(x[0])
        time.sleep(delays[a] if a != fail[0] else 0.01)  # the first failure comes late
        if a in failing:
            raise ValueError(f"block {a}")
        return {"": x}

    def emit(a, b, ws, res):
        got.append(a)
        pool.release(ws)

    with pytest.raises(ValueError, match=f"block {fail[0]}$"):
        _shared_blocks(23, 1, lambda a, b, ws: torch.tensor([float(a)]), pool, quantize, emit, None, helper)
    assert got == list(range(fail[0]))
    assert pool.out == 0 and pool._free.qsize() == pool.size
    assert helper.blocks.waiting() == 0  # no block of the failed tensor is left for the helper
    # and the helper goes on serving: the next tensor's blocks are all computed and emitted
    got.clear()
    failing.clear()
    _shared_blocks(9, 1, lambda a, b, ws: torch.tensor([float(a)]), pool, quantize, emit, None, helper)
    assert got == list(range(9))
    assert pool.out == 0 and pool._free.qsize() == pool.size
    helper.shutdown()


def test_a_refused_block_and_the_ones_behind_it_give_their_workspaces_back():
    """The sink refuses a block (the writer failed): the error reaches the caller, the refused
    block's workspace comes back through the sink, the others through the loop."""
    pool = CountingPool(HELD_BLOCKS + 2)
    helper = KernelHelper()

    def emit(a, b, ws, res):
        pool.release(ws)  # a sink always gives the workspace back, even when it refuses
        if a == 6:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _shared_blocks(
            20,
            1,
            lambda a, b, ws: torch.tensor([float(a)]),
            pool,
            lambda x, ws, st: {"": x},
            emit,
            None,
            helper,
        )
    helper.shutdown()
    assert pool.out == 0 and pool._free.qsize() == pool.size


def test_a_read_failure_gives_back_every_workspace():
    pool = CountingPool(HELD_BLOCKS + 2)
    helper = KernelHelper()

    def read(a, b, ws):
        if a == 9:
            raise OSError("input vanished")
        return torch.tensor([float(a)])

    emitted = []

    def emit(a, b, ws, res):
        emitted.append(a)
        pool.release(ws)

    with pytest.raises(OSError, match="vanished"):
        _shared_blocks(20, 1, read, pool, lambda x, ws, st: {"": x}, emit, None, helper)
    helper.shutdown()
    assert emitted == list(range(len(emitted))) and len(emitted) <= 9
    assert pool.out == 0 and pool._free.qsize() == pool.size


def test_a_pool_too_small_for_the_loop_is_refused():
    helper = KernelHelper()
    with pytest.raises(ValueError, match="more than"):
        _shared_blocks(4, 1, None, WorkspacePool(HELD_BLOCKS), None, None, None, helper)
    helper.shutdown()


def test_the_queue_hands_each_block_to_one_thread_once():
    q = BlockQueue()
    seen: list[int] = []
    lock = threading.Lock()

    class T:
        def __init__(self, i):
            self.i = i

    def compute(t):
        with lock:
            seen.append(t.i)

    th = threading.Thread(target=q.serve, args=(compute,))
    th.start()
    for i in range(200):
        q.add(T(i))
        if i % 3 == 0 and (t := q.take()) is not None:
            compute(t)
    while (t := q.take()) is not None:
        compute(t)
    deadline = time.monotonic() + 5
    while len(seen) < 200 and time.monotonic() < deadline:
        time.sleep(0.001)
    q.close()
    th.join(5)
    assert not th.is_alive()
    assert sorted(seen) == list(range(200))


# ---- failures on every path (found by a hostile review) ------------------------------------------
def _bounded(fn, timeout=20.0):
    """Run ``fn`` on a thread; return what it raised (or None) and fail if it hangs."""
    box: dict[str, BaseException | None] = {"e": None}

    def target():
        try:
            fn()
        except BaseException as e:  # collected for the test
            box["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the block loop hung"
    return box["e"]


def _read(a, b, ws):
    return torch.tensor([float(a)])


def _emit_into(pool, got):
    def emit(a, b, ws, res):
        got.append(a)
        pool.release(ws)

    return emit


def test_ctrl_c_on_this_thread_after_taking_a_block_stops_at_once_and_gives_every_workspace_back(monkeypatch):
    from monoquant.overlap import BlockTask

    pool, helper, got = CountingPool(HELD_BLOCKS + 2), KernelHelper(), []
    real = BlockTask.run
    me: list[int] = []

    def run(self, scratch):
        if not threading.current_thread().name.startswith("monoquant-kernel") and not me:
            me.append(self.a)
            raise KeyboardInterrupt  # as if it landed between take() and the kernel
        return real(self, scratch)

    monkeypatch.setattr(BlockTask, "run", run)

    def slow(x, ws, st):
        time.sleep(0.02)
        return {"": x}

    err = _bounded(lambda: _shared_blocks(20, 1, _read, pool, slow, _emit_into(pool, got), None, helper))
    helper.shutdown()
    assert isinstance(err, KeyboardInterrupt) and me
    assert pool.out == 0 and pool._free.qsize() == pool.size


def test_a_helper_that_cannot_start_fails_the_tensor_cleanly():
    pool, helper, got = CountingPool(HELD_BLOCKS + 2), KernelHelper(), []

    def no_thread(*a, **k):
        raise RuntimeError("can't start new thread")

    helper._executor.submit = no_thread
    err = _bounded(
        lambda: _shared_blocks(
            20, 1, _read, pool, lambda x, ws, st: {"": x}, _emit_into(pool, got), None, helper
        )
    )
    helper.shutdown()
    assert isinstance(err, RuntimeError) and "new thread" in str(err)
    assert pool.out == 0 and pool._free.qsize() == pool.size


def test_a_base_exception_on_the_helper_is_raised_here_and_the_helper_goes_on():
    pool, helper, got = CountingPool(HELD_BLOCKS + 2), KernelHelper(), []
    hit: list[int] = []

    def quantize(x, ws, st):
        if threading.current_thread().name.startswith("monoquant-kernel") and not hit:
            hit.append(int(x[0]))
            raise SystemExit(3)
        time.sleep(0.005)
        return {"": x}

    err = _bounded(lambda: _shared_blocks(20, 1, _read, pool, quantize, _emit_into(pool, got), None, helper))
    assert isinstance(err, SystemExit) and hit
    assert got == list(range(hit[0]))  # the blocks before it, in order, and none after
    assert pool.out == 0 and pool._free.qsize() == pool.size
    got.clear()
    assert (
        _bounded(lambda: _shared_blocks(9, 1, _read, pool, quantize, _emit_into(pool, got), None, helper))
        is None
    )
    assert got == list(range(9))
    helper.shutdown()


def test_an_earlier_blocks_failure_wins_over_a_later_read_error():
    """As in the one-thread loop: block 0's NaN is raised, not block 2's read error."""
    pool, helper, got = CountingPool(HELD_BLOCKS + 2), KernelHelper(), []

    def quantize(x, ws, st):
        if int(x[0]) == 0:
            time.sleep(0.1)
            raise ValueError("block 0 NaN")
        return {"": x}

    def read(a, b, ws):
        if a == 2:
            raise OSError("block 2 unreadable")
        return torch.tensor([float(a)])

    err = _bounded(lambda: _shared_blocks(20, 1, read, pool, quantize, _emit_into(pool, got), None, helper))
    helper.shutdown()
    assert isinstance(err, ValueError) and str(err) == "block 0 NaN"
    assert got == [] and pool.out == 0 and pool._free.qsize() == pool.size


def test_a_read_error_alone_is_raised_after_the_blocks_before_it():
    pool, helper, got = CountingPool(HELD_BLOCKS + 2), KernelHelper(), []

    def read(a, b, ws):
        if a == 7:
            raise OSError("block 7 unreadable")
        return torch.tensor([float(a)])

    err = _bounded(
        lambda: _shared_blocks(
            20, 1, read, pool, lambda x, ws, st: {"": x}, _emit_into(pool, got), None, helper
        )
    )
    helper.shutdown()
    assert isinstance(err, OSError) and "block 7" in str(err)
    assert got == list(range(7)) and pool.out == 0 and pool._free.qsize() == pool.size


def test_ctrl_c_while_the_writer_queue_is_full_leaves_nothing_pending(monkeypatch):
    """``ThreadSink.submit`` interrupted in ``put``: the block's ``on_done`` runs (its workspace
    goes back) and ``drain`` returns once the writer has written the rest."""
    import queue

    from monoquant.overlap import ThreadSink

    gate = threading.Event()
    written: list[int] = []
    sink = ThreadSink(lambda o, off, t: (gate.wait(), written.append(off)), depth=2)
    for i in range(3):  # one on the writer, two queued: the queue is full
        sink.submit([(None, i, None)], None)
    done: list[str] = []

    def put(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(queue.Queue, "put", put)
    with pytest.raises(KeyboardInterrupt):
        sink.submit([(None, 9, None)], lambda: done.append("back"))
    monkeypatch.undo()
    assert done == ["back"]
    gate.set()
    assert _bounded(sink.drain) is None
    assert written == [0, 1, 2]
    sink.close()


# ---- consecutive tensors on one line -------------------------------------------------------------
def test_consecutive_tensors_follow_each_other_and_finish_in_order():
    """Tensor B's blocks are read while A's last ones are still being computed; everything is
    handed over in order, each tensor's finish right behind its last block, and calls queued
    with ``after`` (a kept tensor written meanwhile) in their place."""
    from monoquant.convert import BlockLine, TensorBlocks

    pool, helper = CountingPool(HELD_BLOCKS + 2), KernelHelper()
    line = BlockLine(pool, helper)
    log: list[str] = []
    read_b_before_a_done = []

    def quantize_for(name, slow):
        def quantize(x, ws, st):
            time.sleep(0.03 if slow(int(x[0])) else 0.002)
            st.add_sums(1, float(x[0]) + 1.0, 0.5, 0.0)
            return {"": x}

        return quantize

    def emitter(name):
        def emit(a, b, ws, res):
            log.append(f"{name}{a}")
            pool.release(ws)

        return emit

    sa, sb = ErrorStats(), ErrorStats()

    def read_b(a, b, ws):
        if "A-done" not in log:
            read_b_before_a_done.append(a)
        return torch.tensor([float(a)])

    err = _bounded(
        lambda: (
            line.feed(
                5,
                1,
                _read,
                quantize_for("A", lambda a: a == 4),
                TensorBlocks(emitter("A"), sa, finish=lambda: log.append("A-done")),
            ),
            line.after(lambda: log.append("kept")),
            line.feed(
                3,
                1,
                read_b,
                quantize_for("B", lambda a: False),
                TensorBlocks(emitter("B"), sb, finish=lambda: log.append("B-done")),
            ),
            line.drain(),
        )
    )
    helper.shutdown()
    assert err is None
    assert log == ["A0", "A1", "A2", "A3", "A4", "A-done", "kept", "B0", "B1", "B2", "B-done"]
    assert read_b_before_a_done  # B was read while A's slow last block was still computing
    assert (sa.numel, sa.sum_sq, sb.numel, sb.sum_sq) == (5, 15.0, 3, 6.0)
    assert pool.out == 0 and pool._free.qsize() == pool.size


def test_a_failure_in_a_tensor_still_computing_is_raised_as_its_own_error_later():
    """Tensor A's last block fails while B is being fed: the error raised is A's (mapped by A),
    B is never finished, and after ``abort`` every workspace is back."""
    from monoquant.convert import BlockLine, TensorBlocks

    pool, helper = CountingPool(HELD_BLOCKS + 2), KernelHelper()
    line = BlockLine(pool, helper)
    log: list[str] = []

    def qa(x, ws, st):
        if int(x[0]) == 2:
            time.sleep(0.05)
            raise ValueError("NaN")
        return {"": x}

    def emit(name):
        def f(a, b, ws, res):
            log.append(f"{name}{a}")
            pool.release(ws)

        return f

    def run():
        try:
            line.feed(
                3,
                1,
                _read,
                qa,
                TensorBlocks(
                    emit("A"), None, lambda e: RuntimeError(f"A: {e}"), lambda: log.append("A-done")
                ),
            )
            line.feed(
                6,
                1,
                _read,
                lambda x, ws, st: {"": x},
                TensorBlocks(emit("B"), None, finish=lambda: log.append("B-done")),
            )
            line.drain()
        except BaseException:
            line.abort()
            raise

    err = _bounded(run)
    helper.shutdown()
    assert isinstance(err, RuntimeError) and str(err) == "A: NaN" and line.failed
    assert log == ["A0", "A1"]
    assert pool.out == 0 and pool._free.qsize() == pool.size
