"""Models by Hub id (model/hub.py) from a Hugging Face cache laid out by the test (no network):
the id resolves to its snapshot (at a branch or a revision), serves the same tokens as the
folder, is shown under its id; missing, offline and weightless cases fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve import LLM, SamplingParams
from pdserve.model.bundled import check_model, resolve_model, served_name
from pdserve.model.hub import is_hub_id
from tests.hf_cache import add_to_cache

ID = "pdserve-test/tiny-llama"


@pytest.fixture()
def hub_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf-cache"
    add_to_cache(cache, ID, tiny_model_dir)
    return cache


def test_is_hub_id_and_served_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert not is_hub_id("default") and not is_hub_id("/abs/path") and not is_hub_id("./rel/x")
    assert not is_hub_id("a/b/c") and not is_hub_id("org/model.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert not is_hub_id("org/local")  # a local folder of that name wins (as in vLLM)
    assert served_name("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # the id itself, as vLLM shows it
    assert served_name("default") == "default" and served_name("/models/my-llama") == "my-llama"


def test_hub_id_serves_what_the_folder_serves(hub_cache: Path, tiny_model_dir: Path) -> None:
    folder = resolve_model(ID, download_dir=str(hub_cache))
    assert folder.parent.name == "snapshots" and (folder / "config.json").is_file()
    assert check_model(ID, download_dir=str(hub_cache)) == folder
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = ["The capital of France is", "1, 2, 3,"]
    by_id = LLM(ID, download_dir=str(hub_cache), num_pages=64, page_size=4, threads=1)
    by_path = LLM(str(tiny_model_dir), num_pages=64, page_size=4, threads=1)
    assert [o.output_ids for o in by_id.generate(prompts, params, use_tqdm=False)] == \
        [o.output_ids for o in by_path.generate(prompts, params, use_tqdm=False)]
    assert by_id.engine.model_path == folder


def test_revision_picks_its_snapshot(hub_cache: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    other = add_to_cache(hub_cache, ID, tiny_model_dir, revision="v2", skip=("generation_config.json",))
    assert resolve_model(ID, revision="v2", download_dir=str(hub_cache)) == other
    assert resolve_model(ID, download_dir=str(hub_cache)) != other
    with pytest.raises(FileNotFoundError) as e:
        check_model(ID, revision="v3", download_dir=str(hub_cache))
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "'v3'" in str(e.value) and "\n" not in str(e.value)


def test_offline_missing_and_weightless_fail_in_one_line(hub_cache: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        check_model("pdserve-test/not-cached", download_dir=str(hub_cache))
    message = str(e.value)
    assert "'pdserve-test/not-cached'" in message and "HF_HUB_OFFLINE=1" in message and str(hub_cache) in message
    assert "\n" not in message
    add_to_cache(hub_cache, "pdserve-test/no-weights", tiny_model_dir, skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        check_model("pdserve-test/no-weights", download_dir=str(hub_cache))
    # a tokenizer-only repo is fine as --tokenizer
    assert resolve_model("pdserve-test/no-weights", download_dir=str(hub_cache), weights=False).is_dir()
