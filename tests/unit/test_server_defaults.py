"""Sampling defaults from the model's generation_config.json (--generation-config auto|none|DIR),
served model names (--served-model-name with aliases), and how requests combine with both."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pdserve.engine.messages import EngineReady
from pdserve.model.config import sampling_defaults
from pdserve.server.config import ServerConfig
from pdserve.server.errors import APIError
from pdserve.server.params import check_model, make_params
from pdserve.server.serve import add_serve_arguments, config_from_args
from pdserve.server.state import ServerState
from tests.tiny_model import TOKENIZER_FILES


def model_copy(tmp_path: Path, bundled: Path, gen: dict) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    for name in (*TOKENIZER_FILES, "config.json"):  # config.json: the model's family picks its tool parser
        if (bundled / name).exists() and name != "generation_config.json":
            (folder / name).symlink_to(bundled / name)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def info(path: Path) -> EngineReady:
    return EngineReady(pid=1, model_path=str(path), vocab_size=49152, max_model_len=1024, page_size=16,
                       num_pages=64, max_running=8)


def test_sampling_defaults_reads_vllm_keys(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True, "eos_token_id": 2, "min_p": "x"}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert sampling_defaults(tmp_path / "nowhere") == {}


def test_generation_config_flag_and_request_values_win(tmp_path: Path, bundled_model_dir: Path) -> None:
    folder = model_copy(tmp_path, bundled_model_dir, {"temperature": 0.3, "top_k": 7})
    auto = ServerState.create(ServerConfig(), SimpleNamespace(), info(folder))  # type: ignore[arg-type]
    assert auto.sampling_defaults == {"temperature": 0.3, "top_k": 7}
    none = ServerState.create(ServerConfig(generation_config="none"), SimpleNamespace(), info(folder))  # type: ignore[arg-type]
    assert none.sampling_defaults == {}
    p = make_params(auto, max_new_tokens=4)
    assert (p.temperature, p.top_k, p.top_p) == (0.3, 7, 1.0)
    p = make_params(auto, max_new_tokens=4, temperature=0.0, top_k=None)
    assert (p.temperature, p.top_k) == (0.0, 7)
    assert make_params(none, max_new_tokens=4).temperature == 1.0


def test_served_model_names_and_aliases(tmp_path: Path, bundled_model_dir: Path) -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--served-model-name", "smol", "alias-b", "--generation-config", "none"]))
    assert (cfg.served_model_name, cfg.served_model_aliases, cfg.generation_config) == ("smol", ("alias-b",), "none")
    state = ServerState.create(cfg, SimpleNamespace(), info(bundled_model_dir))  # type: ignore[arg-type]
    check_model(state, "smol")
    check_model(state, "alias-b")
    check_model(state, None)
    for name in ("default", "gpt-4o"):
        with pytest.raises(APIError) as exc:
            check_model(state, name)
        assert exc.value.status == 404 and exc.value.code == "model_not_found"
    plain = ServerState.create(ServerConfig(), SimpleNamespace(), info(bundled_model_dir))  # type: ignore[arg-type]
    check_model(plain, "default")
    check_model(plain, str(bundled_model_dir))
