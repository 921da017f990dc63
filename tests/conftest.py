"""Shared fixtures: real bundled models cut to a few blocks, prepared once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_2blocks(tmp_path_factory):
    from lowbit.models.fixtures import truncated_copy

    return truncated_copy("smollm2-135m", 2, tmp_path_factory.mktemp("smollm2-2b"))


@pytest.fixture(scope="session")
def gemma3_2blocks(tmp_path_factory):
    from lowbit.models.fixtures import truncated_copy

    return truncated_copy("gemma3-270m", 2, tmp_path_factory.mktemp("gemma3-2b"))
