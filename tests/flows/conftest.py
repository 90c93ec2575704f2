"""Prefect lives here only: one real Prefect server (the test harness) for the session.

Started on first use by a test that asks for `prefect_server` and shared with tests/tasks
(the flag on the pytest config), so a full run starts exactly one server; the unit tests of
the form models need none.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real Prefect server for the session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL

    if getattr(request.config, "_eagle_prefect_harness", None):
        yield str(PREFECT_API_URL.value())
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        request.config._eagle_prefect_harness = True  # type: ignore[attr-defined]
        yield str(PREFECT_API_URL.value())
