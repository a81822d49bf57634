"""Cycles, invalidation, reset policies, detach, leverage_to, learning, spills, capacity."""

import math
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxws
from jaxws import (
    LeakedWorkspacePointerError,
    LearningPolicy,
    OutdatedWorkspacePointerError,
    ResetPolicy,
    SpillPolicy,
    WorkspaceConfiguration,
    WorkspaceError,
    WorkspaceFullError,
)

double = jaxws.jit(lambda x: 2.0 * x)
sgd = jaxws.jit(lambda p, x: (p - 0.5 * x, jnp.sum(p * x)), donate_argnums=0)


def workspace(id="WS", **conf):
    return jaxws.get_workspace_manager().get_workspace_for_current_thread(
        WorkspaceConfiguration(**conf), id
    )


def test_outputs_of_a_cycle_are_deleted_when_it_ends():
    ws = workspace()
    with ws:
        y = double(jnp.ones(3))
        assert jaxws.is_attached(y) and not y.is_deleted()
        assert ws.live_bytes() == 12
    assert y.is_deleted()
    assert ws.live_bytes() == 0
    assert (ws.generation, ws.cycles, ws.is_scope_active) == (1, 1, False)


def test_outputs_outside_workspaces_are_not_attached():
    y = double(jnp.ones(3))
    assert not jaxws.is_attached(y)


def test_donated_carry_persists_and_other_outputs_die():
    ws = workspace()
    params = jnp.ones(4)
    for i in range(5):
        with ws:
            pointer = params.unsafe_buffer_pointer()
            previous = params
            params, loss = sgd(params, jnp.ones(4))
            assert previous.is_deleted()
            assert params.unsafe_buffer_pointer() == pointer
        assert loss.is_deleted() and not params.is_deleted()
    np.testing.assert_allclose(params, 1.0 - 2.5)


def test_using_a_value_after_its_cycle_is_leaked_then_outdated():
    ws = workspace("LOOP_EXTERNAL")
    with ws:
        y = double(jnp.ones(2))
    with pytest.raises(LeakedWorkspacePointerError) as info:
        double(y)
    message = str(info.value)
    assert message.startswith(
        "Op [<lambda>] args[0] argument uses leaked workspace pointer from workspace [LOOP_EXTERNAL]"
    )
    assert "generation 1" in message and "jaxws.detach" in message
    with ws:
        with pytest.raises(OutdatedWorkspacePointerError) as info:
            double({"a": [y]})
        assert "args[0]['a'][0]" in str(info.value)
        assert info.value.array_generation == 1 and info.value.workspace_generation == 2
        assert "Open workspaces on this thread: [LOOP_EXTERNAL]" in str(info.value)


def test_destroyed_workspace_arrays_are_leaked():
    ws = workspace(policy_reset=ResetPolicy.ENDOFBUFFER_REACHED, steps_number=3)
    with ws:
        y = double(jnp.ones(2))
    jaxws.get_workspace_manager().destroy_workspace(ws)
    assert y.is_deleted()
    with pytest.raises(LeakedWorkspacePointerError, match="destroyed"):
        jaxws.detach(y)


def test_detach_survives_the_cycle_and_a_hundred_more():
    ws = workspace()
    with ws:
        y = double(jnp.arange(3.0))
        kept = jaxws.detach(y)
        assert kept.unsafe_buffer_pointer() != y.unsafe_buffer_pointer()
    for _ in range(100):
        with ws:
            kept = double(kept) / 2.0  # a new array each cycle: keep a detached reference
            kept = jaxws.detach(kept)
    assert not jaxws.is_attached(kept)
    np.testing.assert_array_equal(kept, [0.0, 2.0, 4.0])


def test_detach_copies_host_leaves_and_keeps_others():
    tree = {"a": np.ones(2), "b": 3, "c": jnp.ones(2)}
    out = jaxws.detach(tree)
    assert out["a"] is not tree["a"] and out["b"] == 3
    assert out["c"] is not tree["c"]


def test_detach_keeps_sharding():
    mesh = jax.make_mesh((8,), ("d",))
    x = jax.device_put(jnp.arange(16.0), jax.NamedSharding(mesh, jax.P("d")))
    assert jaxws.detach(x).sharding == x.sharding


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_endofbuffer_keeps_arrays_for_steps_number_cycles(steps):
    ws = workspace(policy_reset=ResetPolicy.ENDOFBUFFER_REACHED, steps_number=steps)
    made = []
    for _ in range(6):
        with ws:
            made.append(double(jnp.ones(1)))
            alive = [not a.is_deleted() for a in made]
            assert alive[-steps:] == [True] * min(steps, len(made))
            assert not any(alive[:-steps])
    alive = [not a.is_deleted() for a in made]
    assert sum(alive) == steps - 1  # after the last cycle ends


def test_reentering_an_active_workspace_nests_without_a_new_cycle():
    ws = workspace()
    with ws:
        with ws:
            y = double(jnp.ones(1))
        assert not y.is_deleted() and ws.generation == 1
    assert y.is_deleted() and ws.cycles == 1


def test_innermost_workspace_owns_outputs_and_leverage_moves_them_out():
    outer, inner = workspace("OUTER"), workspace("INNER")
    with outer:
        with inner:
            a = double(jnp.ones(1))
            b = jaxws.leverage_to("OUTER", double(jnp.ones(1)))
            c = jaxws.leverage_to(outer, {"x": np.ones(2)})["x"]
        assert a.is_deleted() and not b.is_deleted() and not c.is_deleted()
        np.testing.assert_array_equal(b, [2.0])
    assert b.is_deleted() and c.is_deleted()


def test_leverage_leaves_unattached_arrays_alone_and_needs_an_open_target():
    ws = workspace()
    x = jnp.ones(2)
    with ws:
        assert jaxws.leverage_to(ws, x) is x
    assert not x.is_deleted()
    with pytest.raises(WorkspaceError, match="not open"):
        jaxws.leverage_to(ws, x)
    with pytest.raises(WorkspaceError, match="No workspace \\[NOPE\\]"):
        jaxws.leverage_to("NOPE", x)


def test_get_and_activate_workspace_is_one_cycle():
    mgr = jaxws.get_workspace_manager()
    for i in range(3):
        with mgr.get_and_activate_workspace(id="ACT") as ws:
            assert ws.is_scope_active and mgr.current_workspace is ws
            y = double(jnp.ones(1))
        assert not ws.is_scope_active and y.is_deleted()
    assert ws.cycles == 3
    ws = mgr.get_and_activate_workspace(id="ACT")
    ws.close()
    assert ws.cycles == 4 and not ws.is_scope_active


def test_scope_out_of_workspaces():
    ws = workspace()
    mgr = jaxws.get_workspace_manager()
    with ws:
        with mgr.scope_out_of_workspaces():
            free = double(jnp.ones(1))
        owned = double(jnp.ones(1))
    assert not free.is_deleted() and owned.is_deleted()


def test_closing_more_than_entering_is_an_error():
    ws = workspace()
    with pytest.raises(WorkspaceError, match="closed more often"):
        ws.close()


def test_destroyed_workspace_cannot_be_entered():
    ws = workspace()
    jaxws.get_workspace_manager().destroy_workspace(ws)
    with pytest.raises(WorkspaceError, match="destroyed"):
        with ws:
            pass


def test_other_threads_cannot_use_a_workspace():
    ws = workspace()
    errors = []

    def use():
        for action in (ws.__enter__, lambda: ws.pad(np.ones(2), 0),
                       lambda: jaxws.get_workspace_manager().destroy_workspace(ws)):
            try:
                action()
            except WorkspaceError as e:
                errors.append(str(e))

    thread = threading.Thread(target=use, name="intruder")
    thread.start()
    thread.join()
    assert len(errors) == 3 and all("belongs to thread" in e for e in errors)
    with ws:  # still usable by its owner
        double(jnp.ones(1))


def test_each_thread_has_its_own_manager():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(jaxws.get_workspace_manager()))
    thread.start()
    thread.join()
    assert seen[0] is not jaxws.get_workspace_manager()


# -- learning and spilling ---------------------------------------------------------------


def test_first_loop_learns_the_size_from_the_compiled_plan():
    ws = workspace(overallocation_limit=0.5)
    with ws:
        double(jnp.ones(256))  # 1 KiB output
    plan = ws.plans["<lambda>"]
    need = 1024 + plan.temp_bytes
    assert ws.peak_size == need and ws.current_size == math.ceil(need * 1.5)


def test_over_time_learns_the_largest_cycle():
    ws = workspace(policy_learning=LearningPolicy.OVER_TIME, cycles_before_initialization=3,
                   policy_allocation=jaxws.AllocationPolicy.STRICT)
    for n in (64, 256, 128):
        assert ws.current_size == 0
        with ws:
            double(jnp.ones(n))
    assert ws.current_size == 1024 + ws.plans["<lambda>"].temp_bytes


def _spilling_loop(policy):
    ws = workspace(policy_learning=LearningPolicy.NONE, initial_size=64, policy_spill=policy)
    params = jnp.ones(64)  # 256 bytes of output each step: more than 64
    return ws, params


def test_spill_external_runs_outside_without_donating_and_warns_once():
    ws, params = _spilling_loop(SpillPolicy.EXTERNAL)
    with pytest.warns(jaxws.DonationWarning, match=r"ran outside workspace \[WS\] without donation: the cycle needs \d+ bytes and the workspace holds 64") as caught:
        with ws:
            new, loss = sgd(params, jnp.ones(64))
    assert not params.is_deleted()  # nothing donated
    assert loss.is_deleted() and not new.is_deleted()  # the carry still persists
    assert ws.spills == 1 and ws.spilled_bytes >= 4 and ws.current_size == 64
    assert "SpillPolicy.REALLOCATE" in str(caught[0].message)
    with ws:
        new, loss = sgd(new, jnp.ones(64))  # once per step signature: no second warning
    assert ws.spills == 2


def test_a_small_first_cycle_never_turns_a_later_step_into_a_spill():
    ws = workspace()  # FIRST_LOOP, EXTERNAL spill: the defaults
    log_loss = jaxws.jit(lambda p: (p * p).sum())
    step = jaxws.jit(lambda p, x: (p - 0.1 * x, (p * x).sum() * jnp.ones(4096)), donate_argnums=0)
    params = jnp.ones(4096)
    with ws:
        jaxws.detach(log_loss(params))  # a tiny first cycle: the workspace learns a few bytes
    small = ws.current_size
    for _ in range(3):
        with ws:
            previous = params
            params, big = step(params, jnp.ones(4096))  # 16 KiB of output: learned on first sight
            assert previous.is_deleted()  # donated, every time
    assert ws.spills == 0 and ws.current_size > small and ws.reallocations == 0


def test_spill_fail_raises_and_runs_nothing():
    ws, params = _spilling_loop(SpillPolicy.FAIL)
    with pytest.raises(WorkspaceFullError) as info:
        with ws:
            sgd(params, jnp.ones(64))
    assert info.value.available == 64 and info.value.required > 64
    assert "available" in str(info.value) and "SpillPolicy.REALLOCATE" in str(info.value)
    assert not params.is_deleted()
    assert not ws.is_scope_active


def test_spill_reallocate_grows_before_the_call_and_donates():
    ws, params = _spilling_loop(SpillPolicy.REALLOCATE)
    with ws:
        previous = params
        params, loss = sgd(params, jnp.ones(64))
    assert previous.is_deleted() and loss.is_deleted()  # ran inside: donated, invalidated
    assert ws.reallocations == 1 and ws.current_size > 64 and ws.spills == 0
    with ws:
        params, _ = sgd(params, jnp.ones(64))
    assert ws.reallocations == 1  # it fits now


def test_debug_spill_everything_donates_nothing():
    ws = workspace()
    jaxws.get_workspace_manager().debug_mode = jaxws.DebugMode.SPILL_EVERYTHING
    params = jnp.ones(4)
    with ws:
        new, loss = sgd(params, jnp.ones(4))
    assert not params.is_deleted() and loss.is_deleted() and ws.spills == 1


def test_debug_bypass_everything_attaches_nothing():
    ws = workspace()
    jaxws.get_workspace_manager().debug_mode = jaxws.DebugMode.BYPASS_EVERYTHING
    params = jnp.ones(4)
    with ws:
        new, loss = sgd(params, jnp.ones(4))
    assert not params.is_deleted() and not loss.is_deleted()
    assert not jaxws.is_attached(loss)


def test_debug_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAXWS_WORKSPACES_DEBUG", "SPILL_EVERYTHING")
    assert jaxws.WorkspaceManager().debug_mode is jaxws.DebugMode.SPILL_EVERYTHING
    monkeypatch.setenv("JAXWS_WORKSPACES_DEBUG", "everything")
    with pytest.raises(WorkspaceError, match="BYPASS_EVERYTHING"):
        jaxws.WorkspaceManager()


# -- capacity of dynamic axes ------------------------------------------------------------


def test_pad_learns_capacity_and_masks_padding():
    ws = workspace(policy_allocation=jaxws.AllocationPolicy.OVERALLOCATE, overallocation_limit=1.0)
    with ws:
        (x, y), mask = ws.pad((np.ones((2, 5, 3)), np.ones((2, 5))), axis=1, name="time")
    assert x.shape == (2, 10, 3) and y.shape == (2, 10) and mask.shape == (2, 10)
    assert mask[:, :5].all() and not mask[:, 5:].any()
    assert (x[:, 5:] == 0).all() and ws.capacities == {"time": 10}


def test_pad_rejects_leaves_of_different_lengths():
    ws = workspace()
    with pytest.raises(ValueError, match=r"disagree on the axis length \(\[3, 4\]\)"):
        ws.pad([np.ones(3), np.ones(4)], axis=0)


def test_pad_and_compiled_plan_refuse_bad_arguments_by_name():
    ws = workspace()
    # before: Python's IndexError / TypeError from inside pad, and AttributeError from compiled_plan
    for axis, shape in ((5, [2, 3]), ("a", [2, 3]), (0, [])):
        message = f"pad(axis={axis!r}): expected an axis of every array (shapes [{shape}])"
        with pytest.raises(jaxws.ConfigurationError, match=re.escape(message)):
            ws.pad(np.ones(shape), axis)
    assert ws.capacities == {}  # nothing learned from a refused call
    assert ws.pad(np.ones((2, 3)), -1)[0].shape == (2, 4)
    with pytest.raises(jaxws.ConfigurationError, match=r"compiled_plan\(fun=<int>\): expected a jitted function"):
        jaxws.memory.compiled_plan(5, 1)
    jaxws.get_workspace_manager().destroy_workspace(ws)
    with pytest.raises(jaxws.WorkspaceError, match=r"was destroyed; pad with a new one"):  # before: padded
        ws.pad(np.ones((2, 3)), 1)


def test_variable_lengths_compile_once_per_capacity_bucket(compiles):
    ws = workspace(policy_allocation=jaxws.AllocationPolicy.OVERALLOCATE,
                   overallocation_limit=1.0, policy_spill=SpillPolicy.REALLOCATE)
    total = jaxws.jit(lambda x, m: jnp.sum(jnp.where(m, x, 0.0), axis=1))
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 200, size=200)
    lengths[0] = 3  # learn from a short first batch, so the capacity must grow
    shapes = set()
    for n in lengths:
        with ws:
            x, mask = ws.pad(np.ones((4, n), np.float32), axis=1)
            shapes.add(x.shape)
            np.testing.assert_allclose(jaxws.detach(total(x, mask)), n)
    bound = math.ceil(math.log2(lengths.max() / lengths.min())) + 1
    assert 1 < total.compiles == len(shapes) <= bound


def test_pad_external_spill_pads_nothing_and_counts_bytes():
    ws = workspace(policy_learning=LearningPolicy.FIRST_LOOP, policy_spill=SpillPolicy.EXTERNAL,
                   policy_allocation=jaxws.AllocationPolicy.STRICT)
    with ws:
        ws.pad(np.ones(4, np.float32), axis=0)
    with ws:
        x, mask = ws.pad(np.ones(6, np.float32), axis=0)
    assert x.shape == (6,) and mask.all() and ws.spilled_bytes == 24 and ws.capacities["axis0"] == 4


def test_pad_fail_spill_raises():
    ws = workspace(policy_spill=SpillPolicy.FAIL)
    with ws:
        ws.pad(np.ones(4), axis=0)
    with pytest.raises(WorkspaceFullError, match="axis 'axis0' needs 9 elements, 6"):
        ws.pad(np.ones(9), axis=0)


def test_reallocate_stops_at_max_size_and_spills_beyond():
    ws = workspace(policy_learning=LearningPolicy.NONE, initial_size=64, max_size=128,
                   policy_spill=SpillPolicy.REALLOCATE)
    params = jnp.ones(64)
    with pytest.warns(jaxws.DonationWarning, match="without donation"):
        with ws:
            new, _ = sgd(params, jnp.ones(64))
    assert ws.current_size == 128 and ws.spills == 1 and not params.is_deleted()
