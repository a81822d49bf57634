"""Checkpoints: save, restore in a fresh process, resume to the same numbers; the listener.

Arrays go through orbax-checkpoint, everything else as JSON; a checkpoint holds one
consistent version even while the next step donates the buffers it was copied from.
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("orbax.checkpoint")  # not on every image (the GPU one lacks it)

import jaxws  # noqa: E402
from jaxws.data import ArrayDataSetIterator, AsyncDataSetIterator
from jaxws.nn import (
    LSTM,
    AdaDelta,
    AdaGrad,
    AdaMax,
    Adam,
    AMSGrad,
    BatchNormalization,
    CheckpointListener,
    Dense,
    Dropout,
    ExponentialSchedule,
    FunctionalModel,
    InverseSchedule,
    MapSchedule,
    MultiLayerNetwork,
    Nadam,
    Nesterovs,
    NeuralNetConfiguration,
    OutputLayer,
    PolySchedule,
    RmsProp,
    RnnOutputLayer,
    Sgd,
    SigmoidSchedule,
    StepSchedule,
    TrainingListener,
)
from jaxws.parallel import ParallelWrapper

HERE = Path(__file__).resolve().parent
WORKER = HERE / "checkpoint_process.py"
EPOCHS = 3


def configuration(updater=None):
    return NeuralNetConfiguration(
        layers=[Dense(16, activation="relu"), BatchNormalization(), Dropout(0.3), OutputLayer(3)],
        input_shape=(5,), updater=updater or Adam(1e-2), seed=4)


def data_iterator():
    r = np.random.default_rng(0)
    x = r.normal(size=(100, 5)).astype(np.float32)
    y = r.integers(0, 3, 100).astype(np.int32)
    return ArrayDataSetIterator(x, y, batch_size=16, shuffle=True, seed=7)  # 7 batches, the last of 4


def leaves_of(net):
    return jax.tree.leaves((net.params, net.state, net.updater_state))


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    e["PYTHONPATH"] = str(HERE.parent)
    return e


# -- resuming -----------------------------------------------------------------------------


def test_train_2n_equals_train_n_save_restore_in_a_fresh_process_train_n(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    it = data_iterator()
    listener = CheckpointListener(tmp_path / "run", save_every_n_iterations=10, iterator=it)
    net.add_listeners(listener)
    net.fit(it, epochs=EPOCHS, progress=False)  # 21 steps; checkpoints at 10 and 20
    listener.wait()
    assert [c.iteration for c in listener.available_checkpoints()] == [10, 20]
    first = listener.available_checkpoints()[0]
    assert first.iterator["epoch"] == 1 and first.iterator["position"] == 48  # epoch 1, 3 batches in
    out = tmp_path / "resumed.npz"
    run = subprocess.run([sys.executable, str(WORKER), "resume", str(tmp_path / "run"), "0", str(out)],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    got = np.load(out)
    assert int(got["iteration"]) == net.iteration == 21
    for i, leaf in enumerate(leaves_of(net)):  # params, batch-norm statistics, dropout keys, adam
        np.testing.assert_array_equal(got[f"a{i}"], np.asarray(leaf))


def test_save_and_load_in_process_equal_and_independent(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    net.fit(data_iterator(), progress=False)
    path = net.save(tmp_path / "net")
    copy = MultiLayerNetwork.load(path)
    assert (copy.iteration, copy.epoch) == (net.iteration, net.epoch) == (7, 1)
    assert copy.conf == net.conf
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(copy._carry), jax.tree.leaves(net._carry))
    np.testing.assert_array_equal(jax.random.key_data(copy._rng), jax.random.key_data(net._rng))
    net.fit(data_iterator(), progress=False)  # the copy does not share the buffers the original donates
    assert not any(a.is_deleted() for a in jax.tree.leaves(copy._carry))
    fresh = MultiLayerNetwork.load(path, load_updater=False)
    jax.tree.map(np.testing.assert_array_equal, fresh.params, copy.params)
    assert int(jax.tree.leaves(fresh.updater_state)[0]) == 0  # adam's count starts over


def test_save_replaces_a_checkpoint_or_an_empty_directory_and_refuses_to_delete_anything_else(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("mine too")
    for path, what in ((notes, "a file"), (project, "a directory of 1 entries")):
        with pytest.raises(jaxws.CheckpointError, match=rf"save: .*{path.name} holds {what}, not a jaxws checkpoint, "
                           r"and saving there would delete it; nothing was written"):
            net.save(path)
    assert notes.read_text() == "mine" and [p.name for p in project.iterdir()] == ["train.py"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert net.save(empty) == empty  # an empty directory (tempfile.mkdtemp()) takes the checkpoint
    net.fit(data_iterator(), progress=False)
    net.save(empty)  # and a checkpoint is replaced by the newer one
    assert MultiLayerNetwork.load(empty).iteration == net.iteration == 7



@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_save_that_fails_midway_leaves_the_checkpoint_it_was_replacing(failure, tmp_path, monkeypatch):
    from jaxws.nn.checkpoints import orbax_checkpoint

    net = MultiLayerNetwork(configuration()).init()
    path = net.save(tmp_path / "net")
    saved = jaxws.detach(net.params)
    net.fit(data_iterator(), progress=False)
    handler = orbax_checkpoint().CompositeCheckpointHandler
    original = handler.save

    def fails_midway(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # written, not yet renamed into place
        raise failure

    monkeypatch.setattr(handler, "save", fails_midway)
    with pytest.raises(type(failure)):
        net.save(path)
    monkeypatch.setattr(handler, "save", original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]  # nothing half-written left beside it
    old = MultiLayerNetwork.load(path)  # orbax's force=True had deleted it before writing
    assert old.iteration == 0
    jax.tree.map(np.testing.assert_array_equal, old.params, saved)
    net.save(path)  # and the next save replaces it
    assert MultiLayerNetwork.load(path).iteration == net.iteration == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_an_interrupt_inside_a_restore_leaves_one_whole_version(tmp_path, monkeypatch):
    import _thread

    net = MultiLayerNetwork(configuration()).init()
    net.fit(data_iterator(), progress=False)
    path = net.save(tmp_path / "net")
    trained = jaxws.detach(net.params)
    fresh = MultiLayerNetwork(configuration()).init()
    wrap = jax.random.wrap_key_data

    def interrupted_between(*args, **kwargs):  # called after the params are put, before the counters
        _thread.interrupt_main()
        for _ in range(1000):  # the interrupt arrives here
            pass
        return wrap(*args, **kwargs)

    monkeypatch.setattr(jax.random, "wrap_key_data", interrupted_between)
    with pytest.raises(KeyboardInterrupt):
        fresh.restore(path)
    monkeypatch.setattr(jax.random, "wrap_key_data", wrap)
    assert (fresh.iteration, fresh.epoch) == (7, 1)  # the restore finished, then the interrupt was raised
    jax.tree.map(np.testing.assert_array_equal, fresh.params, trained)

def test_an_async_checkpoint_holds_its_iteration_though_the_next_step_donates(tmp_path):
    net = MultiLayerNetwork(configuration(Sgd(0.1))).init()
    trajectory = {}

    class Record(TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            trajectory[iteration] = [np.array(a) for a in leaves_of(model)]

    listener = CheckpointListener(tmp_path / "async", save_every_n_iterations=3, keep_last=None)
    net.add_listeners(listener, Record())
    net.fit(data_iterator(), epochs=2, progress=False)
    for checkpoint in listener.available_checkpoints():
        restored = listener.load_checkpoint(checkpoint.number)
        assert restored.iteration == checkpoint.iteration
        for a, b in zip(leaves_of(restored), trajectory[checkpoint.iteration]):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_an_async_iterator_records_the_position_it_handed_out(tmp_path):
    base = data_iterator()
    with AsyncDataSetIterator(base, 4) as it:
        for _ in range(3):
            next(it)
        time.sleep(0.05)  # the thread has read further ahead
        assert base.position > 48
        state = it.state_dict()
    assert (state["epoch"], state["position"]) == (0, 48)
    again = data_iterator()
    again.load_state_dict(state)
    np.testing.assert_array_equal(next(again).features, next(data_iterator_at(3)).features)


def test_a_state_that_is_not_a_state_dict_is_refused_and_the_iterator_stays_where_it_was():
    it = data_iterator()
    next(it)
    state = it.state_dict()
    for bad, fragment in ((dict(state, position=10_000), "position=10000, expected an int in 0.."),
                          (dict(state, epoch=-1), "epoch=-1, expected an int >= 0"),
                          (dict(state, position="16"), "position='16', expected an int in 0.."),
                          (None, "load_state_dict(state=<NoneType>): expected the dict that state_dict() returned")):
        again = data_iterator()
        next(again)
        with pytest.raises(jaxws.ConfigurationError, match=re.escape(fragment)):
            again.load_state_dict(bad)
        assert again.state_dict() == state  # nothing moved


def data_iterator_at(batches):
    it = data_iterator()
    for _ in range(batches):
        next(it)
    return it


# -- what round-trips ---------------------------------------------------------------------


UPDATERS = [Sgd(0.1), Nesterovs(0.05, 0.8), Adam(1e-3), AdaMax(2e-3), Nadam(1e-3), AMSGrad(1e-3),
            RmsProp(1e-2), AdaGrad(0.1), AdaDelta(), Adam(ExponentialSchedule(1e-2, 0.99)),
            Sgd(StepSchedule(0.1, 0.5, 3)), Sgd(InverseSchedule(0.1, 0.01, 0.5)), Sgd(PolySchedule(0.1, 2.0, 50)),
            Sgd(SigmoidSchedule(0.1, 0.1, 5)), Sgd(MapSchedule({0: 0.1, 4: 0.01}))]


@pytest.mark.parametrize("updater", UPDATERS, ids=lambda u: f"{type(u).__name__}")
def test_every_named_updater_trains_saves_and_resumes(updater, tmp_path):
    it = data_iterator()
    net = MultiLayerNetwork(configuration(updater)).init()
    net.fit(it, progress=False)
    restored = MultiLayerNetwork.load(net.save(tmp_path / "u", iterator=it))
    assert restored.conf.updater == updater
    resumed = data_iterator()
    resumed.load_state_dict(restored.restored_iterator_state)
    net.fit(it, progress=False)
    restored.fit(resumed, progress=False)
    for a, b in zip(leaves_of(restored), leaves_of(net)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_named_updaters_build_their_optax_transformations():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.asarray([0.5, -1.0, 2.0])}
    pairs = [(Sgd(0.1), optax.sgd(0.1)), (Nesterovs(0.1, 0.9), optax.sgd(0.1, 0.9, nesterov=True)),
             (Adam(1e-2), optax.adam(1e-2)), (AdaMax(1e-2), optax.adamax(1e-2)), (Nadam(1e-2), optax.nadam(1e-2)),
             (AMSGrad(1e-2), optax.amsgrad(1e-2)), (RmsProp(1e-2, 0.9), optax.rmsprop(1e-2, decay=0.9, eps=1e-8)),
             (AdaGrad(0.1), optax.adagrad(0.1, eps=1e-6)), (AdaDelta(0.9, 1e-6), optax.adadelta(1.0, rho=0.9, eps=1e-6))]
    for ours, reference in pairs:
        a, sa = params, ours.init(params)
        b, sb = params, reference.init(params)
        for _ in range(3):
            ua, sa = ours.update(grads, sa, a)
            ub, sb = reference.update(grads, sb, b)
            a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    assert float(ExponentialSchedule(1.0, 0.5)(3)) == 0.125
    assert float(StepSchedule(1.0, 0.5, 2)(3)) == 0.5
    assert float(MapSchedule({0: 1.0, 10: 0.1})(10)) == pytest.approx(0.1)


@pytest.mark.parametrize("layers, shape", [
    ([Dense(4, activation="relu", name="d"), Dropout(0.2), BatchNormalization(decay=0.8), OutputLayer(3, loss="mcxent")], (5,)),
    ([LSTM(6, remat="recompute"), RnnOutputLayer(2, activation="sigmoid", loss="xent")], (None, 3)),
    ([LSTM(4), Dense(4), RnnOutputLayer(2, loss="mse", activation="identity")], (7, 3)),
])
def test_configurations_round_trip_through_json(layers, shape, tmp_path):
    conf = NeuralNetConfiguration(layers=layers, input_shape=shape, updater=RmsProp(1e-3), seed=11,
                                  training_workspace_mode=jaxws.WorkspaceMode.SEPARATE,
                                  inference_workspace_mode=jaxws.WorkspaceMode.NONE)
    assert NeuralNetConfiguration.from_json(conf.to_json()) == conf
    net = MultiLayerNetwork(conf).init()
    copy = MultiLayerNetwork.load(net.save(tmp_path / "c"))
    assert copy.conf == conf
    jax.tree.map(np.testing.assert_array_equal, copy.params, net.params)


@dataclasses.dataclass(frozen=True)
class Scale(jaxws.nn.Layer):
    """A custom layer, found by its module-qualified name when loading."""

    factor: float = 2.0

    def activate(self, params, state, x, training, mgr, mask=None):
        return mgr.leverage_to(jaxws.nn.ArrayType.ACTIVATIONS, x * self.factor), state


def test_custom_layers_load_by_name_and_unknown_ones_say_how():
    conf = NeuralNetConfiguration(layers=[Scale(3.0), OutputLayer(2)], input_shape=(4,), updater=Sgd(0.1))
    text = conf.to_json()
    assert NeuralNetConfiguration.from_json(text) == conf
    renamed = text.replace("test_checkpoints.Scale", "somewhere.Missing")
    with pytest.raises(jaxws.ConfigurationError, match=r"layer type 'somewhere.Missing' is unknown .*custom_layers="):
        NeuralNetConfiguration.from_json(renamed)
    assert NeuralNetConfiguration.from_json(renamed, custom_layers={"somewhere.Missing": Scale}) == conf


def test_a_raw_optax_updater_asks_for_the_configuration(tmp_path):
    conf = NeuralNetConfiguration(layers=[OutputLayer(2)], input_shape=(3,), updater=optax.sgd(0.1))
    path = MultiLayerNetwork(conf).init().save(tmp_path / "raw")
    with pytest.raises(jaxws.ConfigurationError, match=r"raw optax transformation.*conf="):
        MultiLayerNetwork.load(path)
    assert MultiLayerNetwork.load(path, conf=conf).conf is conf


def test_a_functional_model_saves_and_loads_with_its_apply():
    import tempfile

    def apply(p, x, training):
        return x @ p["w"] + p["b"]

    def loss(pred, y, mask):
        return jnp.mean((pred - y) ** 2)

    init = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
    model = FunctionalModel(apply, init, loss=loss, updater=Adam(0.1))
    model.fit((jnp.ones((8, 3)), jnp.ones((8, 1))), epochs=5, progress=False)
    path = model.save(tempfile.mkdtemp() + "/f")
    copy = FunctionalModel.load(path, apply, init, loss=loss, updater=Adam(0.1))
    assert copy.iteration == 5
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(copy._carry), jax.tree.leaves(model._carry))


# -- retention, crashes, bad checkpoints --------------------------------------------------


def test_keep_last_and_keep_every_keep_exactly_those(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    listener = CheckpointListener(tmp_path / "keep", keep_last=2, keep_every=3, save_every_n_iterations=1)
    net.add_listeners(listener)
    net.fit(data_iterator(), progress=False)  # 7 iterations: checkpoints 0..6
    assert [c.number for c in listener.available_checkpoints()] == [0, 3, 5, 6]
    assert [c.iteration for c in listener.available_checkpoints()] == [1, 4, 6, 7]
    assert listener.last_checkpoint().number == 6
    listener.close()
    on_disk = sorted(p.name for p in (tmp_path / "keep").rglob("*") if p.is_dir() and p.name.isdigit())
    assert on_disk == ["0", "3", "5", "6"]  # the others were renamed away (atomically), then removed
    again = CheckpointListener(tmp_path / "keep", save_every_n_epochs=1)  # numbering continues
    net.set_listeners(again)
    net.fit(data_iterator(), progress=False)
    assert again.last_checkpoint().number == 7 and again.last_checkpoint().iteration == 14


def test_a_listener_refuses_a_directory_with_numbered_entries_it_did_not_write(tmp_path):
    """orbax counts every numbered entry as a step and deletes it past keep_last: the user's
    run "0" and "7" would have gone with the first saves."""
    runs = tmp_path / "runs"
    for name in ("0", "7"):
        (runs / name).mkdir(parents=True)
        (runs / name / "notes.txt").write_text("mine")
    with pytest.raises(jaxws.CheckpointError, match=r"'0', '7' there are not jaxws checkpoints; the listener would "
                       r"count them among its own and delete them past keep_last\. Give it a directory of its own"):
        CheckpointListener(runs, keep_last=1, save_every_n_iterations=1)
    assert sorted(p.name for p in runs.iterdir()) == ["0", "7"]
    assert all((runs / name / "notes.txt").read_text() == "mine" for name in ("0", "7"))


def test_save_every_epoch_and_every_time_span(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    epochs = CheckpointListener(tmp_path / "epochs", save_every_n_epochs=2)
    timed = CheckpointListener(tmp_path / "timed", save_every=0.05)

    class Slow(TrainingListener):
        def iteration_done(self, model, iteration, epoch, loss):
            time.sleep(0.02)

    net.add_listeners(epochs, timed, Slow())
    net.fit(data_iterator(), epochs=4, progress=False)
    assert [c.epoch for c in epochs.available_checkpoints()] == [1, 3]  # saved as epochs 1 and 3 end
    assert 4 <= len(timed.available_checkpoints()) <= 28  # 28 iterations of >= 20 ms, one per 50 ms


def test_a_process_killed_mid_save_leaves_the_previous_checkpoints_whole(tmp_path):
    directory = tmp_path / "hammered"
    proc = subprocess.Popen([sys.executable, str(WORKER), "hammer", str(directory)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until some checkpoints are complete, and a save is in flight
            done = [p for p in directory.glob("*") if p.name.isdigit()] if directory.exists() else []
            if len(done) >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    listener = CheckpointListener(directory, save_every_n_iterations=1)
    kept = listener.available_checkpoints()
    assert len(kept) >= 2
    for checkpoint in kept:
        restored = listener.load_checkpoint(checkpoint.number, conf=NeuralNetConfiguration(
            layers=[Dense(1024), Dense(1024), OutputLayer(4)], input_shape=(1024,), updater=optax.sgd(1e-3)))
        assert restored.iteration == checkpoint.iteration
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored.params))



def test_bad_arguments_to_save_load_and_the_listener_are_refused_by_name(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    path = net.save(tmp_path / "net")
    kept = [np.array(a) for a in jax.tree.leaves(net._carry)]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    refused = [  # before: Python's TypeErrors, 'no' taken as True, nothing recorded without a word
        (lambda: net.save(None), r"save\(path=None\): expected a directory path"),
        (lambda: net.save(""), r"save\(path=''\): expected a directory path"),
        (lambda: net.save(tmp_path / "a", save_updater="no"), r"save\(save_updater='no'\): expected True or False"),
        (lambda: net.save(tmp_path / "b", iterator=iter([])), r"save\(iterator=<list_iterator>\): it has no state_dict"),
        (lambda: net.restore(None), r"restore\(path=None\)"),
        (lambda: net.restore(path, load_updater="no"), r"restore\(load_updater='no'\)"),
        (lambda: MultiLayerNetwork.load(5), r"MultiLayerNetwork.load\(path=5\)"),
        (lambda: CheckpointListener(None, save_every_n_iterations=1), r"CheckpointListener\(directory=None\)"),
        (lambda: CheckpointListener(notes, save_every_n_iterations=1), r"notes.txt'\): that is a file"),
        (lambda: CheckpointListener(tmp_path / "c", save_every_n_iterations=1, asynchronous="no"),
         r"CheckpointListener\(asynchronous='no'\)"),
        (lambda: MultiLayerNetwork(5), r"MultiLayerNetwork\(conf=5\): expected a NeuralNetConfiguration"),
    ]
    for call, message in refused:
        with pytest.raises(jaxws.ConfigurationError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net", "notes.txt"]  # nothing written
    assert notes.read_text() == "mine"
    for a, b in zip(jax.tree.leaves(net._carry), kept):
        np.testing.assert_array_equal(np.asarray(a), b)
    listener = CheckpointListener(tmp_path / "run", save_every_n_iterations=1, asynchronous=False)
    listener.save(net)
    for number, message in (("0", r"number='0'\): expected a checkpoint's number"), (True, "number=True")):
        with pytest.raises(jaxws.ConfigurationError, match=message):
            listener.load_checkpoint(number)
    with pytest.raises(jaxws.ConfigurationError, match=r"load_checkpoint\(model=<int>\)"):
        listener.load_checkpoint(model=5)
    assert listener.load_checkpoint(np.int64(0)).iteration == 0  # a numpy integer is a number
    with pytest.raises(TypeError):  # a wrong kind of argument is a TypeError too, as Python's would be
        MultiLayerNetwork(5)
    listener.close()

def test_bad_checkpoints_name_the_problem_and_change_nothing(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    net.fit(data_iterator(), progress=False)
    path = net.save(tmp_path / "good")
    other = MultiLayerNetwork(NeuralNetConfiguration(layers=[Dense(8), OutputLayer(3)], input_shape=(5,))).init()
    before = [np.array(a) for a in jax.tree.leaves(other._carry)]
    with pytest.raises(jaxws.CheckpointError, match=r"does not fit this MultiLayerNetwork: params\.0\.W is float32\[5, 16\] there and float32\[5, 8\] here"):
        other.restore(path)
    with pytest.raises(jaxws.CheckpointError, match=r"No checkpoint at .*missing: the directory does not exist"):
        other.restore(tmp_path / "missing")
    broken = tmp_path / "broken"
    net.save(broken)
    for f in sorted((broken / "arrays").rglob("*")):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])  # truncated
    victim = MultiLayerNetwork(configuration()).init()
    kept = [np.array(a) for a in jax.tree.leaves(victim._carry)]
    with pytest.raises(jaxws.CheckpointError, match=r"Cannot read the arrays of the checkpoint at .*broken"):
        victim.restore(broken)
    for a, b in zip(jax.tree.leaves(other._carry), before):
        np.testing.assert_array_equal(np.asarray(a), b)
    for a, b in zip(jax.tree.leaves(victim._carry), kept):
        np.testing.assert_array_equal(np.asarray(a), b)
    (tmp_path / "plain").mkdir()
    with pytest.raises(jaxws.CheckpointError, match="plain"):
        victim.restore(tmp_path / "plain")


# -- costs --------------------------------------------------------------------------------


def test_the_listener_reads_nothing_between_saves_and_copies_nothing_on_the_device(tmp_path):
    net = MultiLayerNetwork(configuration()).init()
    it = data_iterator()
    net.fit(it, progress=False)  # compile
    grown = []

    class Measured(CheckpointListener):
        def save(self, model):
            def live():
                return sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())

            before = live()
            number = super().save(model)
            grown.append(live() - before)  # device bytes a save leaves behind
            return number

    listener = Measured(tmp_path / "cost", save_every_n_iterations=5)
    net.add_listeners(listener)
    with jax.transfer_guard_device_to_host("disallow"):  # only the saves read, explicitly
        net.fit(it, epochs=2, progress=False)
    listener.wait()
    assert [c.iteration for c in listener.available_checkpoints()] == [10, 15, 20]  # iterations 8..21
    assert grown == [0, 0, 0]  # copied to host memory, nothing on the device


# -- data parallel ------------------------------------------------------------------------


def test_a_parallel_wrapper_checkpoints_the_averaged_model(tmp_path):
    net = MultiLayerNetwork(configuration(Sgd(0.1))).init()
    listener = CheckpointListener(tmp_path / "pw", save_every_n_iterations=1)
    net.add_listeners(listener)
    wrapper = ParallelWrapper(net, workers=2, averaging_frequency=2)
    batches = list(data_iterator())[:6]  # 3 rounds of 2 workers: averaged after rounds 2 and 3
    wrapper.fit(batches)
    last = listener.last_checkpoint()
    restored = listener.load_checkpoint(last.number)
    assert last.iteration == net.iteration == 3
    jax.tree.map(np.testing.assert_array_equal, restored.params, net.params)



@pytest.mark.parametrize("trained_before", [False, True])
def test_a_parallel_wrapper_checkpoint_resumes_its_iterator_where_the_rounds_stopped(trained_before, tmp_path):
    r = np.random.default_rng(2)
    x, y = r.normal(size=(256, 5)).astype(np.float32), r.integers(0, 3, 256).astype(np.int32)
    net = MultiLayerNetwork(configuration(Sgd(0.1))).init()
    it = ArrayDataSetIterator(x, y, 16)
    if trained_before:  # a plain fit over the same iterator first: its resume point is not this pass's
        net.fit(it, progress=False)
    listener = CheckpointListener(tmp_path / "pw", save_every_n_iterations=2, iterator=it, asynchronous=False)
    net.add_listeners(listener)
    ParallelWrapper(net, workers=2, averaging_frequency=2).fit(it)  # 4 groups of 4 batches
    first = listener.available_checkpoints()[0]
    # before: the ring's read-ahead (position 256), or the earlier fit's position (epoch 0)
    assert (first.iterator["epoch"], first.iterator["position"]) == (int(trained_before), 64)
    resumed = listener.load_checkpoint(first.number)
    again = ArrayDataSetIterator(x, y, 16)
    again.load_state_dict(first.iterator)
    ParallelWrapper(resumed, workers=2, averaging_frequency=2).fit(again)
    assert resumed.iteration == net.iteration
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed.params, net.params)
