"""Models named by Hugging Face Hub id (`org/name`), found in or downloaded into the HF cache.

A `--model` value is a Hub id when it has the Hub's `org/name` shape and names no local path
(a local folder of that name wins, as in vLLM). `hub_folder` returns the snapshot folder that
holds the id's files at `revision` (default: the repo's main branch):

    refresh=True   ask the Hub (download what is missing, follow a moved branch); this is the
                   start-up check of `pdserve serve` / `launch`, so a problem is one line there
    refresh=False  the cached snapshot when there is one (the engine process, after that
                   check: no second round trip), else download it

Only what pdserve reads is fetched (`ALLOW_PATTERNS`: config and generation config, tokenizer
files, chat templates, `*.safetensors`). `HF_HUB_OFFLINE=1` never touches the network: the
cache has it or the error says so. The token is huggingface_hub's own (`HF_TOKEN`, or the
`hf auth login` file; `--hf-token` sets `HF_TOKEN` for the server and its engine). Every
failure is a `FileNotFoundError` with one line saying what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
TOKEN_ENV = "HF_TOKEN"
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(model: str | os.PathLike[str]) -> bool:
    """`org/name` that names no local file or folder."""
    text = os.fspath(model).strip()
    return bool(HUB_ID.match(text)) and not text.endswith(".gguf") and not Path(text).expanduser().exists()


def offline() -> bool:
    """HF_HUB_OFFLINE (read now, not at import: a test or a launcher may set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _where(cache_dir: str | None) -> str:
    if cache_dir:
        return cache_dir
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_folder(model_id: str, revision: str | None = None, cache_dir: str | None = None,
               refresh: bool = False, weights: bool = True) -> Path:
    """The snapshot folder of `model_id` (see the module docstring); FileNotFoundError otherwise.
    `weights` False: a tokenizer's repo (config.json and safetensors not required)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    def checked(folder: str) -> Path:
        return _checked(model_id, Path(folder)) if weights else Path(folder)

    kwargs = dict(revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS)
    try:
        if offline() or not refresh:
            try:
                return checked(snapshot_download(model_id, local_files_only=True, **kwargs))
            except LocalEntryNotFoundError:
                if offline():
                    raise FileNotFoundError(
                        f"model {model_id!r}{at} is not in the Hugging Face cache ({_where(cache_dir)}) and "
                        "HF_HUB_OFFLINE=1 forbids downloading it; download it once with the network on, or "
                        "point --download-dir / HF_HUB_CACHE at a cache that holds it") from None
        return checked(snapshot_download(model_id, **kwargs))
    except GatedRepoError:
        raise FileNotFoundError(
            f"model {model_id!r} is gated on the Hugging Face Hub: accept its terms on "
            f"https://huggingface.co/{model_id} and pass --hf-token (or set {TOKEN_ENV})") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"model {model_id!r} has no revision {revision!r} on the Hugging Face Hub") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"model {model_id!r} is neither a local path nor a Hugging Face Hub repository you can read "
            f"(a private one needs --hf-token or {TOKEN_ENV})") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"cannot reach the Hugging Face Hub to download {model_id!r}{at}, and it is not in the cache "
            f"({_where(cache_dir)}); check the network, or set HF_HUB_OFFLINE=1 with a cache that holds it") from None
    except HfHubHTTPError as exc:
        raise FileNotFoundError(f"downloading {model_id!r} from the Hugging Face Hub failed: "
                                f"{str(exc).splitlines()[0]}") from None


def _checked(model_id: str, folder: Path) -> Path:
    """The snapshot holds what pdserve loads: config.json and safetensors weights."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {model_id!r} has no config.json ({folder})")
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"model {model_id!r} has no *.safetensors weights ({folder}); pdserve loads "
                                "safetensors (or a .gguf file given by path)")
    return folder
