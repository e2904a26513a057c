"""What the provenance marks add to each image, on this machine's CPU: ``python -m tests.bench_provenance``.

For 512² and 1024² photographs encoded as PNG (PNG_COMPRESS_LEVEL's default, 1): the PNG encode alone, the
watermark (ours, and invisible-watermark's own ``encode`` for comparison), C2PA signing with a throwaway ES256
certificate, and reading both marks back (``/provenance/verify``'s work). Medians of ``--runs`` runs, in ms;
``--out`` writes them as JSON too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

logger = logging.getLogger("bench_provenance")


def median_ms(fn, runs: int) -> float:
    fn()  # warm: imports, first-use allocations
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def measure(runs: int) -> list[dict]:
    from skimage import data

    from tests.helpers import signing_credentials

    os.environ.update(signing_credentials(tempfile.mkdtemp()))
    from deployments.support import credentials, provenance
    from deployments.support.imaging import encode

    marks = provenance.marker()
    facts = credentials.Facts.of({"model": "sdxl-base", "refiner": "sdxl-refiner"})
    rows = []
    for side in (512, 1024):
        photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.LANCZOS)
        png = encode(photo, "png")
        marked = marks.mark(photo)[0]
        signed = marks.sign(encode(marked, "png"), "png", facts)

        def package_encode(image=photo):
            from imwatermark import WatermarkEncoder

            encoder = WatermarkEncoder()
            encoder.set_watermark("bits", [int(b) for b in marks.settings.watermark_bits])
            encoder.encode(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), "dwtDct", scales=[24, 0, 0])

        rows.append({
            "side": side,
            "png_encode_ms": median_ms(lambda image=photo: encode(image, "png"), runs),
            "watermark_ms": median_ms(lambda image=photo: marks.mark(image), runs),
            "watermark_package_encode_ms": median_ms(package_encode, max(1, runs // 3)),
            "c2pa_sign_ms": median_ms(lambda blob=png: marks.sign(blob, "png", facts), runs),
            "c2pa_bytes": len(signed) - len(encode(marked, "png")),
            "verify_ms": median_ms(lambda blob=signed: marks.verify(blob), runs),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    rows = measure(args.runs)
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    logger.info("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
