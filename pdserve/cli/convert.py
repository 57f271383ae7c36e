"""``pdserve convert``: turn a GGUF file (or the bundled model) into a Hugging Face folder.

Without ``--out`` the folder goes to the cache that ``pdserve serve`` uses, so a later start
skips the conversion; with ``--out`` it is written there. The folder path is printed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_convert_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``convert`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "convert",
        help="convert a GGUF model (default: the bundled SmolLM2) into a Hugging Face folder",
        description="Dequantise a GGUF model to float32 and write a Hugging Face Llama folder "
                    "(config.json, model.safetensors, tokenizer, generation_config.json). "
                    "Prints the folder path.",
    )
    parser.add_argument("--model", default="default",
                        help="'default' (bundled SmolLM2-135M-Instruct), a .gguf file, or an HF "
                             "folder (then nothing is converted and its path is printed)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: the pdserve cache, $PDSERVE_CACHE_DIR or "
                             "~/.cache/pdserve); must be new, empty, or an earlier conversion")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Run ``pdserve convert``; prints the HF folder and returns the exit code."""
    from pdserve.model.bundled import gguf_source, resolve_model
    from pdserve.model.gguf_convert import convert_gguf

    progress = not getattr(args, "no_progress", False)
    model = getattr(args, "model", "default") or "default"
    try:
        source = gguf_source(model)
        if getattr(args, "out", None):
            if source is None:
                folder = resolve_model(model)  # raises FileNotFoundError for unknown paths
                print(f"error: {folder} is already a Hugging Face folder; nothing to convert",
                      file=sys.stderr)
                return 2
            folder = convert_gguf(source, Path(args.out), progress=progress)
        else:
            folder = resolve_model(model, progress=progress)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0

