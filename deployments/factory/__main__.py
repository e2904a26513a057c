"""``python -m deployments.factory OUT_DIR [--full]``: write random-weight models of the real architectures.

Tiny models (the default) serve the tests and the CPU demo; ``--full`` writes full-size models in the exact
on-disk layouts of the official releases, for ``make fullsize`` and the GPU benchmark.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--full", action="store_true", help="full-size models in the official release layouts")
    parser.add_argument("--only", default="", help="comma-separated subset of the full-size artefacts")
    parser.add_argument("--device", default="cpu", help="where full-size weights are initialised (cpu, cuda)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.full:
        from deployments.factory.full import build_all as build_full

        build_full(args.out_dir, only={s for s in args.only.split(",") if s}, device=args.device)
    else:
        from deployments.factory.tiny import build_all

        build_all(args.out_dir)


if __name__ == "__main__":
    main()
