"""The model registry from the command line.

python -m skyreels_batch.models list
python -m skyreels_batch.models export tiny-df DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skyreels_batch.models.registry import UnknownModelError, card_for, cards


def _list() -> None:
    print(f"{'name':48} {'family':6} {'size':>9} {'frames':>6} {'window':>6} {'steps':>5} {'cfg':>4} {'shift':>5}")
    for card in cards():
        d = card.defaults
        kind = " (embedded)" if card.embedded else ""
        print(
            f"{card.name + kind:48} {card.family:6} {d.height:>4}x{d.width:<4} {d.num_frames:>6} "
            f"{d.base_num_frames:>6} {d.num_inference_steps:>5} {d.guidance_scale:>4} {d.shift:>5}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyreels_batch.models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="print the registry")
    export = commands.add_parser("export", help="write an embedded model as a diffusers directory")
    export.add_argument("name", help="embedded model name, e.g. tiny-df")
    export.add_argument("directory", type=Path)
    args = parser.parse_args(argv)

    if args.command == "list":
        _list()
        return 0
    from skyreels_batch.models.embedded import export_embedded  # torch, diffusers, transformers: for export only

    try:
        export_embedded(card_for(args.name), args.directory)
    except (UnknownModelError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
