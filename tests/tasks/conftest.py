"""Prefect's test harness for the task tests: the same one server as tests/flows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def prefect_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real Prefect server for the session (shared with tests/flows); yields its API URL."""
    from prefect.settings import PREFECT_API_URL

    if getattr(request.config, "_eagle_prefect_harness", None):
        yield str(PREFECT_API_URL.value())
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        request.config._eagle_prefect_harness = True  # type: ignore[attr-defined]
        yield str(PREFECT_API_URL.value())
