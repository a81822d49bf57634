"""Shared fixtures: a fresh workspace manager per test, a compile counter.

The 8 virtual CPU devices are configured by the repository's root conftest.py.
"""

import gc

import jax
import pytest

import jaxws


@pytest.fixture(autouse=True)
def _clean_workspaces():
    """Each test starts and ends with no workspaces on the main thread."""
    manager = jaxws.get_workspace_manager()
    manager.destroy_all_workspaces_for_current_thread()
    yield
    manager.destroy_all_workspaces_for_current_thread()
    manager.debug_mode = jaxws.DebugMode.DISABLED
    assert gc.isenabled(), "a workspace loop left Python's gc disabled"


class CompileCounter:
    """Counts XLA backend compiles through jax.monitoring (independent of jaxws)."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def close(self):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture
def compiles():
    counter = CompileCounter()
    yield counter
    counter.close()


collect_ignore = ["parallel_process.py", "checkpoint_process.py"]  # subprocesses of tests, not test modules
