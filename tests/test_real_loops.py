"""Training loops in the styles real JAX code uses, under jax.jit and under jaxws.jit.

Each loop is written as its source writes it (JAX's examples, optax's notebooks); the
jaxws run swaps ``jax.jit`` for ``jaxws.jit`` and adds a workspace cycle per step. The
parameters must be identical: jaxws changes memory, never the numbers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws

STEPS = 6


def cycles(id):
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id=id)
    return lambda: ws


def no_cycle():
    import contextlib

    return contextlib.nullcontext()


def images(n=32, d=20, classes=4, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, d)).astype(np.float32)
    labels = r.integers(0, classes, n)
    return jnp.asarray(x), jax.nn.one_hot(labels, classes)


def identical(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)), a, b)


# -- jax/examples/mnist_classifier.py: stax MLP, example_libraries momentum ---------------


def stax_momentum(jit, cycle):
    from jax.example_libraries import optimizers, stax

    init_random_params, predict = stax.serial(
        stax.Dense(32), stax.Relu, stax.Dense(32), stax.Relu, stax.Dense(4), stax.LogSoftmax)

    def loss(params, batch):
        inputs, targets = batch
        return -jnp.mean(jnp.sum(predict(params, inputs) * targets, axis=1))

    opt_init, opt_update, get_params = optimizers.momentum(0.01, mass=0.9)

    @functools.partial(jit, donate_argnums=1)
    def update(i, opt_state, batch):
        params = get_params(opt_state)
        return opt_update(i, jax.grad(loss)(params, batch), opt_state)

    _, init_params = init_random_params(jax.random.PRNGKey(0), (-1, 20))
    opt_state = opt_init(init_params)
    batch = images()
    for i in range(STEPS):
        with cycle():
            opt_state = update(i, opt_state, batch)
    return get_params(opt_state)


# -- jax/examples/differentially_private_sgd.py: typed keys, vmap-ed per-example grads ----


def dp_sgd(jit, cycle):
    def predict(params, x):
        for w, b in params[:-1]:
            x = jnp.tanh(x @ w + b)
        w, b = params[-1]
        return jax.nn.log_softmax(x @ w + b)

    def loss(params, batch):
        inputs, targets = batch
        return -jnp.mean(jnp.sum(predict(params, inputs) * targets, axis=-1))

    def clipped_grad(params, l2_norm_clip, single_example_batch):
        grads = jax.grad(loss)(params, single_example_batch)
        leaves, tree = jax.tree.flatten(grads)
        total = jnp.sqrt(sum(jnp.vdot(g, g) for g in leaves))
        divisor = jnp.maximum(total / l2_norm_clip, 1.0)
        return jax.tree.unflatten(tree, [g / divisor for g in leaves])

    def private_grad(params, batch, rng, l2_norm_clip, noise_multiplier, batch_size):
        per_example = jax.vmap(clipped_grad, (None, None, 0))(params, l2_norm_clip, (batch[0][:, None], batch[1][:, None]))
        leaves, tree = jax.tree.flatten(per_example)
        rngs = jax.random.split(rng, len(leaves))
        summed = [g.sum(0) for g in leaves]
        noised = [(g + l2_norm_clip * noise_multiplier * jax.random.normal(r, g.shape)) / batch_size
                  for r, g in zip(rngs, summed)]
        return jax.tree.unflatten(tree, noised)

    opt = optax.sgd(0.1, momentum=0.9)

    @functools.partial(jit, donate_argnums=(0, 1, 2))
    def private_update(params, opt_state, key, batch):
        key, sub = jax.random.split(key)
        grads = private_grad(params, batch, sub, 1.0, 1.1, batch[0].shape[0])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key

    key = jax.random.key(0)  # a typed key, as JAX recommends
    shapes = [(20, 16), (16, 16), (16, 4)]
    params = [(jax.random.normal(k, s) * 0.1, jnp.zeros(s[1])) for k, s in zip(jax.random.split(jax.random.key(1), 3), shapes)]
    opt_state = opt.init(params)
    batch = images()
    for _ in range(STEPS):
        with cycle():
            params, opt_state, key = private_update(params, opt_state, key, batch)
    return params, jax.random.key_data(key)


# -- optax gradient accumulation: MultiSteps, microbatches, AOT ---------------------------


def multisteps_aot(jit, cycle):
    model = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    opt = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3)
    params = {"w1": jax.random.normal(jax.random.key(2), (20, 16)) * 0.1,
              "w2": jax.random.normal(jax.random.key(3), (16, 4)) * 0.1}
    opt_state = opt.init(params)

    def train_step(params, opt_state, x, y):
        grads = jax.grad(lambda p: optax.softmax_cross_entropy(model(p, x), y).mean())(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = images(48)
    micro = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)]
    step = jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, *micro[0]).compile()
    for xb, yb in micro:
        with cycle():
            params, opt_state = step(params, opt_state, xb, yb)
    return params


# -- jax's k8s train_mnist.py: shard_map over a static mesh, psum of gradients ------------


MESH = jax.make_mesh((4,), ("batch",))


def shard_map_step(jit, cycle):
    def loss(params, x, y):
        return optax.softmax_cross_entropy(jnp.tanh(x @ params["w"]) @ params["v"], y).mean()

    @functools.partial(jax.shard_map, mesh=MESH, in_specs=(jax.P(), jax.P("batch"), jax.P("batch")),
                       out_specs=(jax.P(), jax.P()))
    def grads_and_loss(params, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return jax.lax.pmean(grads, "batch"), jax.lax.pmean(value, "batch")

    @functools.partial(jit, donate_argnums=0)
    def step(params, x, y):
        grads, value = grads_and_loss(params, x, y)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    replicated = jax.NamedSharding(MESH, jax.P())
    params = jax.device_put({"w": jax.random.normal(jax.random.key(4), (20, 16)) * 0.1,
                             "v": jax.random.normal(jax.random.key(5), (16, 4)) * 0.1}, replicated)
    x, y = images(32)
    x, y = jax.device_put((x, y), jax.NamedSharding(MESH, jax.P("batch")))
    losses = []
    for _ in range(STEPS):
        with cycle():
            params, value = step(params, x, y)
            losses.append(float(value))
    return params, losses


LOOPS = {"stax + momentum": stax_momentum, "DP-SGD, typed keys": dp_sgd,
         "optax MultiSteps, AOT": multisteps_aot, "shard_map, static mesh": shard_map_step}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_jaxws_jit_gives_the_parameters_of_jax_jit(loop):
    expected = LOOPS[loop](jax.jit, no_cycle)
    got = LOOPS[loop](jaxws.jit, cycles(f"REAL_{loop}"))
    identical(got, expected)
    ws = jaxws.get_workspace_manager().workspace(f"REAL_{loop}")
    assert ws.cycles == (STEPS if loop != "optax MultiSteps, AOT" else 6) and ws.spills == 0
