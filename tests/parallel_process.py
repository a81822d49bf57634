"""One of two processes for test_parallel.test_two_processes_equal_one_process (not a test).

Each process has 2 virtual CPU devices; together 4 workers, numbered process by process.
Process p supplies the batches of its own workers: global batch j goes to worker j mod 4.
"""

import sys


def main(port: int, pid: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np
    import optax

    import jaxws

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_parallel import make_batches, network

    jaxws.parallel.initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    batches = make_batches(16, seed=1)
    mine = [b for j, b in enumerate(batches) if (j % 4) // 2 == pid]
    net = network(optax.adam(1e-2))
    net.save(f"{out}/checkpoint")  # replaced below, by the processes together
    jaxws.parallel.ParallelWrapper(net, averaging_frequency=2).fit(mine)
    leaves = jax.tree.leaves(net.params)
    np.savez(f"{out}/params_{pid}.npz", **{f"p{i}": np.asarray(a) for i, a in enumerate(leaves)})
    net.save(f"{out}/checkpoint")  # every process takes part; the averaged model is written once
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
