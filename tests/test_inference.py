"""ParallelInference: concurrent callers get model.output's answers, merged into few programs."""

import _thread
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxws
from jaxws.nn import Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer
from jaxws.parallel import InferenceMode, ParallelInference


def network():
    conf = NeuralNetConfiguration(layers=[Dense(16, activation="tanh"), OutputLayer(4)],
                                  input_shape=(6,), updater=optax.sgd(0.1), seed=1)
    return MultiLayerNetwork(conf).init()


def hammer(pi, threads=12, requests=8, seed=0):
    """Many threads, requests of 1..9 rows; returns (inputs, outputs) per request."""
    results, errors = [], []

    def caller(i):
        r = np.random.default_rng(seed + i)
        for _ in range(requests):
            x = r.normal(size=(int(r.integers(1, 10)), 6)).astype(np.float32)
            try:
                results.append((x, pi.output(x)))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    return results


@pytest.mark.parametrize("mode", list(InferenceMode))
@pytest.mark.parametrize("workers", [1, 3])
def test_concurrent_callers_get_the_model_output(mode, workers):
    net = network()
    with ParallelInference(net, inference_mode=mode, batch_limit=16, workers=workers) as pi:
        results = hammer(pi)
    assert len(results) == 96
    for x, y in results:
        np.testing.assert_allclose(y, np.asarray(net.output(x)), rtol=1e-5, atol=1e-6)
    if mode is InferenceMode.SEQUENTIAL:
        assert pi.executions == 96


def test_batched_mode_merges_requests_into_bucketed_programs():
    net = network()
    with ParallelInference(net, batch_limit=16) as pi:
        results = hammer(pi, threads=16, requests=10)
        rows = sum(len(x) for x, _ in results)
        assert -(-rows // 16) <= pi.executions < 160  # requests were merged, never past the limit
    # padded to powers of two up to the limit: one program per bucket size that ran
    assert set(pi.batch_sizes) <= {1, 2, 4, 8, 16}
    assert net._inference_fn(False).compiles == len(pi.batch_sizes)
    assert sum(pi.batch_sizes.values()) == pi.executions


def test_a_request_larger_than_the_limit_runs_alone():
    net = network()
    x = np.ones((40, 6), np.float32)
    with ParallelInference(net, batch_limit=8) as pi:
        np.testing.assert_allclose(pi.output(x), np.asarray(net.output(x)), rtol=1e-5)


def test_a_bad_request_fails_only_for_its_caller():
    net = network()
    with ParallelInference(net) as pi:
        with pytest.raises(jaxws.InvalidBatchError, match=r"expects features of shape \[batch, 6\], received \[2, 5\]"):
            pi.output(np.ones((2, 5), np.float32))
        assert pi.output(np.ones((2, 6), np.float32)).shape == (2, 4)


def test_callers_serve_each_other_on_their_own_threads_and_close_is_idempotent():
    threads_before = set(threading.enumerate())
    pi = ParallelInference(network(), workers=2)
    ran_on = []
    compute = pi._compute
    pi._compute = lambda slot, taken: (ran_on.append(threading.current_thread()), compute(slot, taken))[1]
    assert pi.output(np.ones((3, 6), np.float32)).shape == (3, 4)
    assert ran_on == [threading.current_thread()]  # a lone caller runs its request at once, itself
    pi.close()
    pi.close()
    assert set(threading.enumerate()) - threads_before == set()  # no server thread was started
    with pytest.raises(jaxws.WorkspaceError, match="is closed"):
        pi.output(np.ones((1, 6), np.float32))


def slowed(pi, seconds, started):
    """``pi``'s batches take ``seconds`` longer; ``started`` is set as the first begins."""
    compute = pi._compute

    def slow(slot, taken):
        started.set()
        time.sleep(seconds)
        return compute(slot, taken)

    pi._compute = slow


def test_close_lets_the_running_batch_finish_and_fails_the_waiting_requests():
    net = network()
    x = np.ones((2, 6), np.float32)
    pi = ParallelInference(net, workers=1)
    started, outcomes = threading.Event(), {}
    slowed(pi, 0.3, started)

    def caller(name):
        try:
            outcomes[name] = pi.output(x)
        except jaxws.WorkspaceError as e:
            outcomes[name] = e

    running = threading.Thread(target=caller, args=("running",))
    running.start()
    started.wait()
    waiting = threading.Thread(target=caller, args=("waiting",))
    waiting.start()
    while not pi._pending:
        time.sleep(0.001)
    pi.close()
    assert (pi.executions, pi._free) == (1, [0])  # close returned once the running batch was done
    running.join()
    waiting.join()
    np.testing.assert_allclose(outcomes["running"], np.asarray(net.output(x)), rtol=1e-5, atol=1e-6)
    assert "was closed before this request ran" in str(outcomes["waiting"])


def test_a_caller_interrupted_while_it_runs_a_batch_hands_the_other_requests_on():
    net = network()
    x, y, z = (np.full((n, 6), v, np.float32) for n, v in ((2, 1.0), (3, 0.5), (1, -1.0)))
    pi = ParallelInference(net, batch_limit=8)
    pi.output(x)  # compiled
    answers, merged = {}, []
    first = threading.Thread(target=lambda: answers.setdefault("z", pi.output(z)))
    helper = threading.Thread(target=lambda: answers.setdefault("y", pi.output(y)))
    compute = pi._compute

    def patched(slot, taken):
        if threading.current_thread() is first:
            while len(pi._pending) < 2:  # this caller's and the helper's requests wait for the slot
                time.sleep(0.001)
        elif threading.current_thread() is threading.main_thread():
            merged.append(len(taken))
            _thread.interrupt_main()
            time.sleep(0.05)  # the interrupt lands here, while the model runs
        return compute(slot, taken)

    def queue_the_helper():
        while not pi._pending:
            time.sleep(0.001)
        helper.start()

    pi._compute = patched
    first.start()
    while pi._free:
        time.sleep(0.001)
    threading.Thread(target=queue_the_helper).start()
    with pytest.raises(KeyboardInterrupt):
        pi.output(x)  # runs its request and the helper's, merged, once the first batch is done
    assert merged == [2]
    first.join()
    helper.join(timeout=10)
    assert not helper.is_alive()  # the helper's request went back to the queue and the helper ran it
    np.testing.assert_allclose(answers["y"], np.asarray(net.output(y)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers["z"], np.asarray(net.output(z)), rtol=1e-5, atol=1e-6)
    assert (pi.executions, pi._free, list(pi._pending)) == (3, [0], [])  # the interrupted batch never counted
    pi._compute = compute
    np.testing.assert_allclose(pi.output(x), np.asarray(net.output(x)), rtol=1e-5, atol=1e-6)
    pi.close()


def test_a_caller_interrupted_while_it_waits_leaves_the_queue():
    net = network()
    x = np.ones((2, 6), np.float32)
    pi = ParallelInference(net)
    started, answers = threading.Event(), []
    slowed(pi, 0.5, started)
    helper = threading.Thread(target=lambda: answers.append(pi.output(x)))
    helper.start()
    started.wait()
    main = threading.main_thread().ident
    threading.Timer(0.1, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        pi.output(np.ones((5, 6), np.float32))  # waits for the helper's batch
    assert list(pi._pending) == []  # the request left with its caller
    helper.join()
    assert pi.executions == 1 and pi.batch_sizes == {2: 1}  # nobody ran the abandoned request
    pi.close()


def test_request_shapes_are_judged_once_per_signature():
    net = network()
    judged = []
    check = net._check_batch
    net._check_batch = lambda ds, op, shapes=True: (judged.append(shapes), check(ds, op, shapes))[1]
    with ParallelInference(net) as pi:
        for rows in (3, 3, 3, 5, 3, 5):
            pi.output(np.ones((rows, 6), np.float32))
    assert judged.count(True) == 2


def test_a_failure_in_the_model_reaches_the_callers_with_its_cause():
    net = network()

    def broken(*args):
        raise FloatingPointError("device fell over")

    net._infer[False] = jaxws.jit(broken)  # what the workers will call (raises as it traces)
    with ParallelInference(net, workers=2) as pi:
        for _ in range(3):
            with pytest.raises(FloatingPointError, match="device fell over"):
                pi.output(np.ones((1, 6), np.float32))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch_limit": 0}, "batch_limit=0"), ({"queue_limit": -1}, "queue_limit=-1"),
    ({"workers": 0}, "workers=0"), ({"inference_mode": "batched"}, "inference_mode='batched'"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(jaxws.ConfigurationError) as info:
        ParallelInference(network(), **kwargs)
    assert fragment in str(info.value)


def test_builder():
    pi = (ParallelInference.Builder(network()).inference_mode(InferenceMode.SEQUENTIAL)
          .batch_limit(8).queue_limit(4).workers(2).build())
    assert (pi.inference_mode, pi.batch_limit, pi.queue_limit, pi.workers) == (InferenceMode.SEQUENTIAL, 8, 4, 2)
    pi.close()


# -- ownership: replicas, update_model, shapes, close -----------------------------------


def test_workers_hold_their_own_replicas_so_training_the_model_is_safe():
    net = network()
    x = np.ones((3, 6), np.float32)
    data = [(np.random.default_rng(i).normal(size=(8, 6)).astype(np.float32), np.zeros(8, np.int32)) for i in range(4)]
    with ParallelInference(net, workers=2) as pi:
        before = pi.output(x)
        for _ in range(3):
            net.fit(data, progress=False)  # donates the model's own buffers each step
            for _ in range(4):
                np.testing.assert_allclose(pi.output(x), before, rtol=1e-6)  # still the version it copied
        pi.update_model(net)
        np.testing.assert_allclose(pi.output(x), np.asarray(net.output(x)), rtol=1e-5, atol=1e-6)
        assert not np.allclose(pi.output(x), before)


def test_update_model_swaps_atomically_while_requests_flow():
    old, new = network(), network()
    new.set_params(jax.tree.map(lambda a: a + 1.0, jaxws.detach(new.params)))
    x = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    expected = [np.asarray(old.output(x)), np.asarray(new.output(x))]
    with ParallelInference(old, workers=2, batch_limit=8) as pi:
        stop = threading.Event()
        seen, errors = [], []

        def caller():
            while not stop.is_set():
                try:
                    seen.append(pi.output(x))
                except Exception as e:  # noqa: BLE001
                    errors.append(e)

        threads = [threading.Thread(target=caller) for _ in range(6)]
        for t in threads:
            t.start()
        swaps, deadline = 0, time.monotonic() + 10
        while (len(seen) < 200 or swaps < 20) and time.monotonic() < deadline:
            pi.update_model(new if swaps % 2 == 0 else old)
            swaps += 1
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and len(seen) >= 200 and swaps >= 20
    for y in seen:  # every answer is wholly one version's
        assert any(np.allclose(y, e, rtol=1e-5, atol=1e-6) for e in expected)


def test_requests_of_another_shape_never_fail_their_neighbours():
    from jaxws.nn import LSTM, RnnOutputLayer

    conf = NeuralNetConfiguration(layers=[LSTM(4), RnnOutputLayer(2)], input_shape=(None, 3), seed=0)
    net = MultiLayerNetwork(conf).init()
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(2, 5 if i % 2 else 7, 3)).astype(np.float32) for i in range(16)]
    results, errors = {}, []
    with ParallelInference(net, batch_limit=32) as pi:
        barrier = threading.Barrier(16)

        def caller(i):
            barrier.wait()
            try:
                results[i] = pi.output(requests[i])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 2 <= pi.executions < 16  # requests of one length were merged, the two lengths never
    assert errors == []
    for i, x in enumerate(requests):
        np.testing.assert_allclose(results[i], np.asarray(net.output(x)), rtol=1e-5, atol=1e-6)


def test_close_while_sixteen_threads_call_leaves_no_caller_blocked():
    net = network()
    x = np.ones((1, 6), np.float32)
    blocked_total = 0
    for _ in range(50):
        pi = ParallelInference(net, queue_limit=2, workers=1)
        outcomes = []

        def caller():
            try:
                while True:
                    pi.output(x)
            except jaxws.WorkspaceError as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=caller, daemon=True) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.005)
        pi.close()
        for t in threads:
            t.join(timeout=1.0)
        blocked_total += sum(t.is_alive() for t in threads)
        assert all("closed" in o for o in outcomes)
    assert blocked_total == 0


def test_a_dead_input_is_named_before_its_shape():
    net = network()
    ws = jaxws.get_workspace_manager().get_workspace_for_current_thread(id="REQ")
    with ws:
        x = jaxws.jit(lambda a: a * 2)(jnp.ones((2, 5)))  # wrong shape and about to die
    with ParallelInference(net) as pi:
        with pytest.raises(jaxws.LeakedWorkspacePointerError, match=r"Op \[ParallelInference.output\] x.features"):
            pi.output(x)
