"""jaxws.jit: donation verified and shown, errors before anything runs, compiles, syncs."""

import contextlib
import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws import DeletedArrayError, DonationError


def adam_step():
    opt = optax.adam(1e-2)

    def loss_fn(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        return jnp.mean((h @ params["w2"] - y) ** 2)

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.key(0)
    params = {
        "w1": jax.random.normal(key, (8, 16)) * 0.1,
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(key, (16, 1)) * 0.1,
    }
    return step, params, opt.init(params)


def test_donated_carry_reuses_its_buffers():
    step, params, opt_state = adam_step()
    jstep = jaxws.jit(step, donate_argnums=(0, 1))
    x, y = jnp.ones((4, 8)), jnp.ones((4, 1))
    leaves = jax.tree.leaves((params, opt_state))
    pointers = [a.unsafe_buffer_pointer() for a in leaves]
    params, opt_state, loss = jstep(params, opt_state, x, y)
    assert all(a.is_deleted() for a in leaves)
    new = jax.tree.leaves((params, opt_state))
    assert sorted(a.unsafe_buffer_pointer() for a in new) == sorted(pointers)
    (plan,) = jstep.plans
    assert plan.memory.alias_bytes == sum(a.nbytes for a in new)


def test_matches_plain_jax_jit_numbers():
    step, params, opt_state = adam_step()
    ref = jax.jit(step)
    ours = jaxws.jit(step, donate_argnums=(0, 1))
    x, y = jnp.ones((4, 8)), jnp.ones((4, 1))
    p_ref, s_ref = params, opt_state
    p, s = jaxws.detach((params, opt_state))
    for _ in range(5):
        p_ref, s_ref, _ = ref(p_ref, s_ref, x, y)
        p, s, _ = ours(p, s, x, y)
    jax.tree.map(np.testing.assert_allclose, p, p_ref)


def test_dtype_change_raises_donation_error_before_running():
    calls = []

    def step(w):
        jax.debug.callback(lambda: calls.append(1))
        return (w.astype(jnp.float32) * 2).astype(jnp.bfloat16)

    jstep = jaxws.jit(step, donate_argnums=0)
    w = jnp.ones(1024, jnp.float32)
    with pytest.raises(DonationError) as info:
        jstep({"layer": {"w": w}}["layer"]["w"])
    message = str(info.value)
    assert "args[0]: float32[1024]" in message and "bfloat16[1024]" in message
    assert "astype" in message
    assert not w.is_deleted() and calls == [] and jstep.compiles == 0


def test_donation_error_names_the_leaf_path():
    jstep = jaxws.jit(lambda p: {"w": p["w"].astype(jnp.bfloat16), "b": p["b"]}, donate_argnums=0)
    with pytest.raises(DonationError, match=r"args\[0\]\['w'\]: float32\[3\]"):
        jstep({"w": jnp.ones(3), "b": jnp.ones(2)})


def test_unusable_donation_warn():
    jstep = jaxws.jit(lambda w: w.sum(), donate_argnums=0, unusable_donation="warn")
    with pytest.warns(jaxws.DonationWarning, match="cannot reuse 1 donated"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Some donated buffers")
            assert float(jstep(jnp.ones(3))) == 3.0
    with pytest.raises(ValueError, match="unusable_donation='never'"):
        jaxws.jit(lambda w: w, unusable_donation="never")


def test_sharding_change_is_caught_by_the_compiled_alias_size():
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.NamedSharding(mesh, jax.P("d"))
    replicated = jax.NamedSharding(mesh, jax.P())
    jstep = jaxws.jit(lambda x: x + 1, donate_argnums=0, out_shardings=replicated)
    x = jax.device_put(jnp.ones(64), sharded)
    with pytest.raises(DonationError, match="sharding"):
        jstep(x)
    assert not x.is_deleted()


def test_donate_argnames_and_static_args():
    def step(w, n, *, scale):
        return w * scale + n

    jstep = jaxws.jit(step, static_argnums=1, donate_argnames="w")
    w = jnp.ones(3)
    out = jstep(w, 2, scale=3.0)
    assert w.is_deleted() and out.tolist() == [5.0, 5.0, 5.0]
    out = jstep(out, 3, scale=1.0)
    assert out.tolist() == [8.0, 8.0, 8.0] and jstep.compiles == 2


def test_returned_inputs_keep_their_attachment():
    identity = jaxws.jit(lambda a: a)
    pair = jaxws.jit(lambda a, b: (a, b + 1))
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="FWD")
    a = jnp.ones(2)
    with ws:
        same = identity(a)
        passed, new = pair(a, jnp.ones(2))
        made_here = pair(a, jnp.ones(2))[1]
        returned_again = identity(made_here)
    assert new.is_deleted() and made_here.is_deleted()
    # what merely passed through belongs where its input does: nowhere, so it lives on
    assert not a.is_deleted() and not same.is_deleted() and not passed.is_deleted()
    assert not jaxws.is_attached(same) and not jaxws.is_attached(passed)
    assert returned_again is made_here or returned_again.is_deleted()  # the cycle's, like its input


def test_a_value_passed_through_a_donating_step_survives_the_cycle():
    step = jaxws.jit(lambda p, lr: (p - lr, lr), donate_argnums=0)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="LR")
    p, lr = jnp.ones(3), jnp.asarray(0.1)
    for _ in range(3):
        with ws:
            p, lr = step(p, lr)
    np.testing.assert_allclose(p, 0.7, rtol=1e-6)
    assert float(lr) == pytest.approx(0.1)


def test_a_carry_made_inside_a_cycle_says_why_it_died():
    init = jaxws.jit(lambda: jnp.zeros(3))
    step = jaxws.jit(lambda p: p + 1, donate_argnums=0)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="CARRY")
    with ws:
        params = step(init())  # made in this cycle: it belongs to it, donated or not
    with pytest.raises(jaxws.OutdatedWorkspacePointerError, match=r"loop carry .* params = jaxws.detach\(init\(\)\)"):
        with ws:
            step(params)
    params = jaxws.detach(init())  # the fix
    for _ in range(3):
        with ws:
            params = step(params)
    assert params.tolist() == [3.0, 3.0, 3.0]


def test_reusing_a_donated_input_says_what_to_do():
    jstep = jaxws.jit(lambda w: w + 1, donate_argnums=0)
    w = jnp.ones(2)
    jstep(w)
    with pytest.raises(DeletedArrayError, match=r"args\[0\] argument \(float32\[2\]\) was deleted"):
        jstep(w)


def test_decorator_form_and_jit_surface():
    @jaxws.jit(donate_argnums=0)
    def step(w):
        return w * 2

    assert step.__name__ == "step" and "step" in repr(step)
    assert step.memory_plan(jnp.ones(4)).alias_bytes == 16
    assert step.eval_shape(jnp.ones(4)).shape == (4,)


def test_thousand_cycles_flat_memory_one_compile(compiles):
    step, params, opt_state = adam_step()
    jstep = jaxws.jit(step, donate_argnums=(0, 1))
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="TRAIN")
    x, y = jnp.ones((4, 8)), jnp.ones((4, 1))
    live = []
    for i in range(1000):
        with ws:
            params, opt_state, loss = jstep(params, opt_state, x, y)
        if i % 100 == 99:
            live.append(jaxws.memory.live_bytes())
    assert jstep.compiles == 1 and compiles.count == 1 and ws.compiles == 1
    assert len(set(live)) == 1, live
    assert ws.live_bytes() == 0


def test_no_device_to_host_transfer_per_step():
    step, params, opt_state = adam_step()
    jstep = jaxws.jit(step, donate_argnums=(0, 1))
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="NOSYNC")
    x, y = jnp.ones((4, 8)), jnp.ones((4, 1))
    params, opt_state, _ = jstep(params, opt_state, x, y)  # compile outside the guard
    with jax.transfer_guard_device_to_host("disallow"):
        for _ in range(20):
            with ws:
                params, opt_state, loss = jstep(params, opt_state, x, y)
                kept = jaxws.detach(loss)
    assert np.isfinite(float(kept))


# -- every argument kind jax.jit accepts -------------------------------------------------


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_prng_keys_donated_or_not(make_key):
    split = jaxws.jit(lambda k: jax.random.split(k)[0], donate_argnums=0)
    draw = jaxws.jit(lambda k, shape: jax.random.normal(k, shape), static_argnums=1)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="KEYS")
    key, ref = make_key(0), make_key(0)
    for _ in range(3):
        with ws:
            old = key
            key = split(key)
            sample = jaxws.detach(draw(key, (2,)))
        ref = jax.random.split(ref)[0]
        assert old.is_deleted()
        np.testing.assert_array_equal(sample, jax.random.normal(ref, (2,)))
    assert jax.random.key_data(key).tolist() == jax.random.key_data(ref).tolist()


def test_none_leaves_scalars_numpy_and_static_args_by_name():
    @jaxws.jit(static_argnames="mode", donate_argnames="w")
    def step(w, x, scale, extra=None, *, mode="add"):
        out = w + x * scale if mode == "add" else w * x * scale
        return out if extra is None else out + extra["b"]

    w = jnp.ones(3)
    out = step(w, np.float32(2.0), 3, extra={"a": None, "b": np.ones(3, np.float32)}, mode="add")
    assert w.is_deleted() and out.tolist() == [8.0, 8.0, 8.0]
    out = step(out, 2.0, 0.5, mode="mul")
    assert out.tolist() == [8.0, 8.0, 8.0]
    assert step.compiles == 2  # one per static mode: Python scalars and numpy scalars do not retrace


def test_static_args_by_position_and_donation_by_position():
    step = jaxws.jit(lambda n, w: w * n, static_argnums=0, donate_argnums=1)
    w = jnp.ones(2)
    assert step(3, w).tolist() == [3.0, 3.0] and w.is_deleted()


# -- under other transformations, inside and outside a cycle ------------------------------


def loss_fn(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


TRANSFORMS = {
    "grad": lambda f, w, x: jax.grad(f)(w, x),
    "vjp": lambda f, w, x: jax.vjp(lambda w: f(w, x), w)[1](1.0)[0],
    "vmap": lambda f, w, x: jax.vmap(f, in_axes=(None, 0))(w, x[:, None]),
    "scan body": lambda f, w, x: jax.lax.scan(lambda c, xi: (c + f(w, xi[None]), None), 0.0, x)[0],
    "fori_loop body": lambda f, w, x: jax.lax.fori_loop(0, 3, lambda i, c: c + f(w, x), 0.0),
    "checkpoint": lambda f, w, x: jax.grad(jax.checkpoint(f))(w, x),
    "outer jit": lambda f, w, x: jax.jit(lambda w, x: f(w, x) * 2)(w, x),
    "shard_map": lambda f, w, x: _sharded_sum(f, w, x),
}


def _sharded_sum(f, w, x):
    mesh = jax.make_mesh((2,), ("d",))
    w = jax.device_put(w, jax.NamedSharding(mesh, jax.P()))
    x = jax.device_put(x, jax.NamedSharding(mesh, jax.P("d")))
    return jax.shard_map(lambda w, x: jax.lax.psum(f(w, x), "d"), mesh=mesh,
                         in_specs=(jax.P(), jax.P("d")), out_specs=jax.P())(w, x)


@pytest.mark.parametrize("in_cycle", [False, True], ids=["outside", "inside a cycle"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_under_transformations_it_is_jax_jit(transform, in_cycle):
    w = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4)), jnp.float32)
    expected = TRANSFORMS[transform](jax.jit(loss_fn), w, x)
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="T")
    with ws if in_cycle else contextlib.nullcontext():
        got = TRANSFORMS[transform](jaxws.jit(loss_fn), w, x)
        kept = jaxws.detach(got)
    np.testing.assert_allclose(kept, expected, rtol=1e-6)
    assert not w.is_deleted() and not x.is_deleted()


def test_a_donating_step_under_vmap_donates_as_jax_jit_does():
    step = jaxws.jit(lambda w: w * 2, donate_argnums=0)
    ref = jax.jit(lambda w: w * 2, donate_argnums=0)
    a, b = jnp.ones((3, 2)), jnp.ones((3, 2))
    np.testing.assert_array_equal(jax.vmap(step)(a), jax.vmap(ref)(b))
    assert a.is_deleted() == b.is_deleted()


# -- methods, the jax.jit surface, AOT ---------------------------------------------------


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    @functools.partial(jaxws.jit, static_argnums=0)
    def apply(self, x):
        return x * self.factor


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    w: jax.Array

    @jaxws.jit
    def __call__(self, x):
        return x @ self.w


def test_methods_with_static_self_and_pytree_self():
    assert Scaler(3.0).apply(jnp.ones(2)).tolist() == [3.0, 3.0]
    assert Scaler(2.0).apply(jnp.ones(2)).tolist() == [2.0, 2.0]
    layer = Linear(jnp.eye(2) * 2)
    assert layer(jnp.ones(2)).tolist() == [2.0, 2.0]
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="M")
    with ws:
        y = layer(jnp.ones(2))
    assert y.is_deleted() and not layer.w.is_deleted()


def test_clear_cache_recompiles():
    step = jaxws.jit(lambda w: w + 1, donate_argnums=0)
    step(jnp.ones(2))
    step.clear_cache()
    assert step.plans == []
    step(jnp.ones(2))
    assert step.compiles == 2 and len(step.plans) == 1


def test_lower_trace_eval_shape():
    step = jaxws.jit(lambda w, x: w + x, donate_argnums=0)
    w, x = jnp.ones(4), jnp.ones(4)
    assert "add" in step.lower(w, x).as_text()
    assert step.trace(w, x).jaxpr is not None
    assert step.eval_shape(w, x).shape == (4,)
    assert not w.is_deleted()


def test_aot_compile_keeps_the_donation_checks():
    bad = jaxws.jit(lambda p: (p.astype(jnp.float32) * 2), donate_argnums=0)
    p = jnp.ones(8, jnp.bfloat16)
    with pytest.raises(DonationError, match=r"args\[0\]: bfloat16\[8\] -> no output"):
        bad.lower(p).compile()
    assert not p.is_deleted()
    good = jaxws.jit(lambda p, x: (p - x, (p * x).sum()), donate_argnums=0)
    compiled = good.lower(jnp.ones(4), jnp.ones(4)).compile()
    assert compiled.plan.donated == (0,) and compiled.memory_analysis() is not None
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="AOT")
    params = jnp.ones(4)
    with ws:
        new, loss = compiled(params, jnp.ones(4))
    assert params.is_deleted() and loss.is_deleted() and not new.is_deleted()
    with pytest.raises(jaxws.LeakedWorkspacePointerError, match=r"Op \[<lambda>\] args\[1\] argument uses leaked"):
        compiled(new, loss)
    with pytest.raises(DonationError, match="passed 2 times"):
        compiled(new, new)


def test_keyword_and_positional_calls_of_one_structure_keep_their_own_plans():
    # f(x, k=y) and f((x,), {"k": y}) flatten to the same tree; each call form has its own plan
    f = jaxws.jit(lambda *args, **kw: {"kw": jax.tree.map(lambda a: a * 2, kw)} if kw else jax.tree.map(lambda a: a + 1, args))
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="KWPLANS")
    x, y = jnp.ones(2), jnp.full(3, 2.0)
    with ws:
        by_name = f(x, k=y)
        by_position = f((x,), {"k": y})
        assert by_name["kw"]["k"].tolist() == [4.0, 4.0, 4.0]
        assert [a.tolist() for a in jax.tree.leaves(by_position)] == [[2.0, 2.0], [3.0, 3.0, 3.0]]
    assert len(f.plans) == 2
    assert all(a.is_deleted() for a in jax.tree.leaves((by_name, by_position)))  # both attached as fresh
    assert not x.is_deleted() and not y.is_deleted()


def test_the_private_fast_paths_answer_as_the_public_api_does():
    # jaxws reads three things from JAX's private modules; each must mean what its public API says
    from jaxws._internals import EVAL_TRACE, ArrayImpl, _PublicTopTrace, flatten, trace_state

    def concrete():  # what jaxws.jit's call reads inline, and the public fallback's answer
        fast, public = trace_state.value is EVAL_TRACE, _PublicTopTrace().value is EVAL_TRACE
        assert fast == public
        return fast

    tree = ({"b": jnp.ones(2), "a": [1.0, None, np.zeros(3)]}, jaxws.data.DataSet(jnp.ones(3), jnp.zeros(3)))
    leaves, treedef = flatten(tree)
    public_leaves, public_treedef = jax.tree_util.tree_flatten(tree)
    assert treedef == public_treedef and all(a is b for a, b in zip(leaves, public_leaves, strict=True))
    assert ArrayImpl is None or (type(jnp.ones(2)) is ArrayImpl and isinstance(jnp.ones(2), jax.Array))
    seen = []

    def record(x):
        seen.append(concrete())
        return x * 2

    assert concrete()
    jax.jit(record)(1.0)
    jax.grad(record)(1.0)
    jax.vmap(record)(jnp.ones(2))
    assert seen == [False, False, False]


def test_a_planned_call_keeps_the_plan_of_its_own_arguments_whatever_ran_meanwhile():
    # the lean path (fit's, evaluation's, output's) plans a signature at its first call; a
    # call of the same function with other arguments in between (another thread's) must not
    # leave its plan under that signature
    f = jaxws.jit(lambda a: a * 2)
    small, large = jnp.ones(3), jnp.ones((4, 5))
    donating = f._donating

    def meanwhile(*args, **kwargs):
        f._donating = donating
        f(large)  # another caller, planned in between
        return donating(*args, **kwargs)

    meanwhile.trace = donating.trace
    f._donating = meanwhile
    np.testing.assert_array_equal(f._call_planned("small", (small,)), 2 * np.ones(3))
    assert f._planned["small"] is f._plan_of((small,), {}) is not f._plan_of((large,), {})
    assert f._planned["small"].out_bytes == small.nbytes  # its own output: f32[3]
    np.testing.assert_array_equal(f._call_planned("small", (small,)), 2 * np.ones(3))


def test_a_loop_over_arrays_laid_across_cpu_devices_runs_each_call_once_the_one_before_is_done():
    """A GSPMD step over several CPU devices: queued by the dozen, XLA's all-reduce deadlocks
    and aborts the process (a plain jax.jit loop of 500 such steps did), so each call waits
    for its carry; the numbers are those of the same loop on one device."""
    step, params, opt_state = adam_step()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rows, replicated = jax.NamedSharding(mesh, jax.P("data")), jax.NamedSharding(mesh, jax.P())
    r = np.random.default_rng(0)
    xs = [r.normal(size=(16, 8)).astype(np.float32) for _ in range(12)]
    y = r.normal(size=(16, 1)).astype(np.float32)
    placed = [(jax.device_put(a, rows), jax.device_put(y, rows)) for a in xs]
    spread = jaxws.jit(step, donate_argnums=(0, 1))
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="GSPMD_LOOP")
    expected = jax.tree.map(jnp.copy, (params, opt_state))  # device_put may share their buffers
    carry = jax.device_put((params, opt_state), replicated)
    with ws:
        carry = spread(*carry, *placed[0])[:2]
    ready, donating = [], spread._donating

    class Watched:  # was the carry computed when the call came?
        def __call__(self, *args):
            ready.append(all(leaf.is_ready() for leaf in jax.tree.leaves(args[:2])))
            return donating(*args)

        def __getattr__(self, name):
            return getattr(donating, name)

    spread._donating = Watched()
    for a, b in placed[1:]:
        with ws:
            carry = spread(*carry, a, b)[:2]
    assert len(ready) == 11 and all(ready)
    one = jaxws.jit(step, donate_argnums=(0, 1))
    for a in xs:
        with ws:
            expected = one(*expected, a, y)[:2]
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6), carry, expected)
    assert all(not a.is_deleted() and not b.is_deleted() for a, b in placed)  # the user's batches
