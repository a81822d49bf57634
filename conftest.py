"""Before anything imports JAX's backends: CPU with 8 virtual devices, for every test."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
    """Doctests that save checkpoints need orbax-checkpoint, which not every image has."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("orbax") is None:
        skip = pytest.mark.skip(reason="orbax-checkpoint is not installed")
        for item in items:
            if "Doctest" in type(item).__name__ and ("save" in item.name or "checkpoint" in item.name):
                item.add_marker(skip)
