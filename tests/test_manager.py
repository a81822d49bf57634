"""Managers: destroy, statistics, gc window."""

import gc
import sys
import threading
import time

import jax
import jax.numpy as jnp
import pytest

import jaxws

double = jaxws.jit(lambda x: 2.0 * x)


def test_destroy_all_returns_live_bytes_to_the_baseline():
    mgr = jaxws.get_workspace_manager()
    conf = jaxws.WorkspaceConfiguration(policy_reset=jaxws.ResetPolicy.ENDOFBUFFER_REACHED,
                                        steps_number=50)
    x = jnp.ones(1 << 16)
    gc.collect()  # earlier tests' garbage must not be freed mid-measurement
    baseline = jaxws.memory.live_bytes()
    held = []  # the user still holds every output: only destroy frees them
    for id in ("A", "B"):
        ws = mgr.get_workspace_for_current_thread(conf, id)
        for _ in range(10):
            with ws:
                held.append(double(x))
    assert jaxws.memory.live_bytes() == baseline + 20 * x.nbytes
    assert jaxws.memory.live_bytes_by_workspace() == {"A": 10 * x.nbytes, "B": 10 * x.nbytes}
    mgr.destroy_all_workspaces_for_current_thread()
    assert jaxws.memory.live_bytes() == baseline
    assert all(a.is_deleted() for a in held)
    assert mgr.allocation_statistics() == []


def test_destroying_an_open_workspace_closes_it():
    mgr = jaxws.get_workspace_manager()
    ws = mgr.get_workspace_for_current_thread(id="OPEN")
    ws.__enter__()
    y = double(jnp.ones(2))
    mgr.destroy_workspace(ws)
    assert y.is_deleted() and mgr.current_workspace is None and gc.isenabled()
    mgr.destroy_workspace(ws)  # idempotent


def test_same_id_with_another_configuration_is_refused():
    mgr = jaxws.get_workspace_manager()
    mgr.get_workspace_for_current_thread(jaxws.WorkspaceConfiguration(), "X")
    assert mgr.get_workspace_for_current_thread(None, "X").id == "X"
    with pytest.raises(jaxws.WorkspaceError, match="already exists"):
        mgr.get_workspace_for_current_thread(jaxws.WorkspaceConfiguration(min_size=1), "X")


def test_allocation_statistics_table(capsys):
    mgr = jaxws.get_workspace_manager()
    with mgr.get_and_activate_workspace(id="STATS") as ws:
        double(jnp.ones(64))
    assert ws.cycles == 1
    (stats,) = mgr.allocation_statistics()
    assert stats.id == "STATS" and stats.cycles == 1 and stats.compiles in (0, 1)
    assert stats.peak_size >= 256
    text = jaxws.print_allocation_statistics_for_current_thread()
    assert "STATS" in capsys.readouterr().out and "peak" in text


def _run_cycles(seconds):
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="GC")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with ws:
            assert not gc.isenabled()
            junk = [[] for _ in range(100)]
            for j in junk:
                j.append(j)  # cyclic garbage that would trigger automatic gc


@pytest.fixture
def gc_starts():
    starts = []

    def callback(phase, info):
        if phase == "start":
            starts.append(time.monotonic())

    gc.callbacks.append(callback)
    memory = jaxws.get_memory_manager()
    window, periodic = memory.auto_gc_window, memory.periodic_gc_enabled
    yield starts
    gc.callbacks.remove(callback)
    memory.set_auto_gc_window(window)
    memory.toggle_periodic_gc(periodic)


def test_gc_window_allows_one_collection_per_window(gc_starts):
    memory = jaxws.get_memory_manager()
    memory.set_auto_gc_window(100)
    memory.toggle_periodic_gc(True)
    _run_cycles(0.55)
    assert 3 <= len(gc_starts) <= 7  # ~0.55 s / 100 ms, and never automatic
    gaps = [b - a for a, b in zip(gc_starts, gc_starts[1:])]
    assert min(gaps) >= 0.099
    assert not gc.isenabled()  # between cycles of the loop too
    time.sleep(memory.idle_restore_ms / 1000 + 0.3)
    assert gc.isenabled()  # the loop ended: restored by the jaxws-gc-window thread
    assert any(t.name == "jaxws-gc-window" and t.daemon for t in threading.enumerate())


def test_periodic_gc_off_means_no_collection_in_the_loop(gc_starts):
    memory = jaxws.get_memory_manager()
    memory.toggle_periodic_gc(False)
    _run_cycles(0.2)
    assert gc_starts == []


def test_a_window_of_zero_collects_at_every_cycle_boundary(gc_starts):
    memory = jaxws.get_memory_manager()
    memory.set_auto_gc_window(0)
    memory.toggle_periodic_gc(True)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="GC")
    before = memory.collections
    for _ in range(20):
        with ws:
            pass
    assert memory.collections - before == 20 and len(gc_starts) >= 20


def test_cycles_read_no_clock_and_the_watcher_marks_each_window(gc_starts, monkeypatch):
    """The loop's boundary only counts itself and checks the watcher's mark: the main
    thread reads the clock once per collection, not per cycle."""
    memory = jaxws.get_memory_manager()
    memory.set_auto_gc_window(50)
    memory.toggle_periodic_gc(True)
    reads = []
    clock = time.monotonic
    main = threading.get_ident()

    def counted():
        if threading.get_ident() == main and sys._getframe(1).f_globals["__name__"].startswith("jaxws."):
            reads.append(1)
        return clock()

    monkeypatch.setattr(jaxws.manager.time, "monotonic", counted)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="GC")
    cycles, start = 0, clock()
    while clock() - start < 0.3:
        with ws:
            cycles += 1
    assert cycles > 1000
    assert 2 <= len(gc_starts) <= 8  # ~0.3 s / 50 ms
    assert len(reads) == len(gc_starts)  # one read per collection, none per cycle


def test_a_loop_of_short_cycles_keeps_gc_off_while_it_runs(gc_starts):
    # most of each step is outside the cycle: the watcher sees the loop alive in the count
    # of cycles that ended, not in an open one
    memory = jaxws.get_memory_manager()
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="GC")
    end = time.monotonic() + 3 * memory.idle_restore_ms / 1000
    while time.monotonic() < end:
        with ws:
            pass
        time.sleep(0.002)
        assert not gc.isenabled()  # between cycles (entering one would turn it off again)
    time.sleep(memory.idle_restore_ms / 1000 + 0.3)
    assert gc.isenabled()


def test_gc_state_before_the_loop_is_restored(gc_starts):
    gc.disable()
    try:
        _run_cycles(0.01)
        jaxws.get_memory_manager().end_loop()
        assert not gc.isenabled()
    finally:
        gc.enable()
    _run_cycles(0.01)
    jaxws.get_memory_manager().end_loop()
    assert gc.isenabled()


def test_memory_manager_close_joins_its_thread():
    memory = jaxws.MemoryManager(idle_restore_ms=10_000)
    memory._loop_entered()
    assert not gc.isenabled() and memory._thread.is_alive()
    memory.close()
    memory.close()
    assert gc.isenabled() and memory._thread is None


def test_bad_gc_window():
    with pytest.raises(ValueError, match="ms=-5"):
        jaxws.get_memory_manager().set_auto_gc_window(-5)
    periodic = jaxws.get_memory_manager().periodic_gc_enabled
    with pytest.raises(jaxws.ConfigurationError, match=r"toggle_periodic_gc\(enabled='no'\): expected True or False"):
        jaxws.get_memory_manager().toggle_periodic_gc("no")  # before: taken as True
    assert jaxws.get_memory_manager().periodic_gc_enabled == periodic


def test_workspace_ids_are_names_and_destroy_takes_a_workspace():
    manager = jaxws.get_workspace_manager()
    for bad in (None, 5, ""):  # before: made, and then every list of the ids failed to sort
        with pytest.raises(jaxws.ConfigurationError, match=rf"id={bad!r}\): expected a workspace name"):
            manager.get_workspace_for_current_thread(id=bad)
    ws = manager.get_workspace_for_current_thread(id="NAMED")
    with pytest.raises(jaxws.WorkspaceError, match=r"No workspace \[NOPE\] on this thread \(workspaces here: .*NAMED"):
        jaxws.leverage_to("NOPE", jnp.ones(2))
    with pytest.raises(jaxws.ConfigurationError, match=r"destroy_workspace\(ws='NAMED'\): expected a Workspace"):
        manager.destroy_workspace("NAMED")  # before: AttributeError
    manager.destroy_workspace(ws)
    assert not manager.check_if_workspace_exists("NAMED")


def test_memory_plan_and_device_stats():
    plan = jaxws.memory.compiled_plan(jax.jit(lambda x: x + 1, donate_argnums=0), jnp.ones(256))
    assert plan.alias_bytes == 1024 and plan.peak_bytes == plan.argument_bytes + plan.output_bytes + plan.temp_bytes - 1024
    assert "alias 1.0 KiB" in str(plan)
    assert jaxws.memory.device_memory_stats() is None  # CPU
    assert jaxws.memory.peak_bytes_in_use() is None
    assert jaxws.memory.tree_bytes({"a": jnp.ones(3), "b": 1}) == 12
    assert jaxws.memory.format_bytes(1536) == "1.5 KiB"


def test_gc_stays_off_while_another_thread_is_inside_a_cycle():
    memory = jaxws.get_memory_manager()
    inside, leave = threading.Event(), threading.Event()

    def long_cycle():
        with jaxws.get_workspace_manager().get_workspace_for_current_thread(id="LONG"):
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=long_cycle, name="long-cycle", daemon=True)
    worker.start()
    try:
        assert inside.wait(10)
        _run_cycles(0.01)  # this thread's loop ends; the other's cycle is still open
        time.sleep(memory.idle_restore_ms / 1000 + 0.3)
        memory.end_loop()
        assert not gc.isenabled()
    finally:
        leave.set()
        worker.join()
    time.sleep(memory.idle_restore_ms / 1000 + 0.3)
    assert gc.isenabled()  # every cycle closed and idle: restored


def test_a_cycle_whose_exit_an_interrupt_skipped_does_not_keep_gc_off():
    memory = jaxws.get_memory_manager()
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="SKIPPED_GC")

    def opened_and_interrupted():  # what an interrupt at __exit__'s first instruction leaves
        ws.__enter__()

    opened_and_interrupted()
    assert ws.is_scope_active and not gc.isenabled()
    time.sleep(memory.idle_restore_ms / 1000 + 0.3)
    assert gc.isenabled()  # before: off for good, unless the workspace was entered again or destroyed
    with ws:  # the next entry ends the stale cycle
        assert not gc.isenabled()
    assert not ws.is_scope_active
    jaxws.get_workspace_manager().destroy_workspace(ws)
