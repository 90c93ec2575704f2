"""Fixtures for the storage tests: every store test runs on a local root AND on S3 (moto)."""

from __future__ import annotations

import pytest

from storage import ArtifactStore


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty artifact root: a local directory, or a fresh bucket on the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_root")


@pytest.fixture
def store(root: str) -> ArtifactStore:
    return ArtifactStore(root)
