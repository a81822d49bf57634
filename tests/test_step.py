"""jaxws.jit: donation verified and shown, errors before anything runs, compiles, syncs."""

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
        maybe_copy, new = pair(a, jnp.ones(2))
    assert not a.is_deleted() and new.is_deleted()
    # JAX returns the input object itself (kept) or a copy (owned by the cycle)
    assert same is a or same.is_deleted()
    assert maybe_copy is a or maybe_copy.is_deleted()


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
