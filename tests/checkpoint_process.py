"""A fresh process for test_checkpoints (not a test): resume from a checkpoint, or save under fire.

``resume DIR NUMBER STEPS_OUT``: load checkpoint NUMBER of DIR, move a new iterator to the
recorded position, train to the end, write the parameters and updater state to STEPS_OUT.
``hammer DIR``: save a large model every iteration until killed.
"""

import sys


def resume(directory: str, number: int, out: str) -> None:
    import jax
    import numpy as np

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_checkpoints import EPOCHS, data_iterator

    from jaxws.nn import CheckpointListener

    listener = CheckpointListener(directory, save_every_n_iterations=10**9)
    net = listener.load_checkpoint(number)
    it = data_iterator()
    info = next(c for c in listener.available_checkpoints() if c.number == number)
    it.load_state_dict(info.iterator)
    net.fit(it, epochs=EPOCHS - it.epoch, progress=False)
    leaves = jax.tree.leaves((net.params, net.state, net.updater_state))
    np.savez(out, iteration=net.iteration, **{f"a{i}": np.asarray(a) for i, a in enumerate(leaves)})


def hammer(directory: str) -> None:
    import numpy as np
    import optax

    from jaxws.nn import CheckpointListener, Dense, MultiLayerNetwork, NeuralNetConfiguration, OutputLayer

    conf = NeuralNetConfiguration(layers=[Dense(1024), Dense(1024), OutputLayer(4)], input_shape=(1024,),
                                  updater=optax.sgd(1e-3))
    net = MultiLayerNetwork(conf).init()
    net.add_listeners(CheckpointListener(directory, keep_last=3, save_every_n_iterations=1))
    x = np.ones((8, 1024), np.float32)
    y = np.zeros(8, np.int32)
    while True:
        net.fit((x, y), progress=False)


if __name__ == "__main__":
    if sys.argv[1] == "resume":
        resume(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        hammer(sys.argv[2])
