"""ParallelInference: concurrent callers get model.output's answers, merged into few programs."""

import threading

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


def inference_threads():
    return [t for t in threading.enumerate() if t.name.startswith("jaxws-inference")]


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
        hammer(pi, threads=16, requests=10)
        assert pi.executions < 160  # requests were merged
    # padded to powers of two up to the limit: 1, 2, 4, 8, 16 rows at most
    assert net._inference_fn(False).compiles <= 5


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


def test_close_is_idempotent_and_leaves_no_thread():
    pi = ParallelInference(network(), workers=2)
    assert len(inference_threads()) == 2
    pi.close()
    pi.close()
    assert inference_threads() == []
    with pytest.raises(jaxws.WorkspaceError, match="is closed"):
        pi.output(np.ones((1, 6), np.float32))


def test_a_failure_in_the_model_reaches_the_callers_with_its_cause():
    net = network()

    def broken(*args):
        raise FloatingPointError("device fell over")

    net._infer[False] = broken  # what the workers will call
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
    assert (pi.inference_mode, pi.batch_limit, pi.queue_limit, len(pi._threads)) == (InferenceMode.SEQUENTIAL, 8, 4, 2)
    pi.close()
