"""``imagegen``: the service from a shell. Each command maps onto the HTTP routes a client already has, so the
CLI needs nothing but ``httpx`` (it never imports torch, Ray or diffusers and runs on any laptop; Pillow, a
dependency of the package, is imported only to write an ``-o`` that is not a PNG):

- ``generate``: a seed 003 text2img job (``--sampler``, ``--checkpoint``), or a seed 000 ``/generate/async`` job
  when ``--hires`` or ``--faces`` asks for that plan; both submitted with ``Accept: text/event-stream`` so the
  progress bar follows the job's own events, then the image from ``/jobs/{id}/result``.
- ``batch-sizes``: seed 002's ``/generate/batch-sizes``; every size written to a folder. ``sizes``: the named
  sizes it accepts (``GET /generate/batch-sizes``).
- ``upscale`` and ``faces``: Automatic1111's ``/sdapi/v1/extra-single-image``.
- ``jobs list|show|cancel|wait``: the jobs routes; ``wait`` follows ``/jobs/{id}/events``.

Server, token and timeout: ``--url`` / ``--token`` / ``--timeout`` or ``IMAGEGEN_URL`` / ``IMAGEGEN_TOKEN`` /
``IMAGEGEN_TIMEOUT``. Failures are one line on stderr and an exit status (``EXIT_STATUSES``, shown by ``--help``).
``-`` is stdin for an input image and stdout for a single output image.

This module parses the arguments and dispatches; the commands are in ``graphs.cli_commands``, reading and
writing images in ``graphs.cli_files``, the HTTP side (jobs, event streams, the progress bar) in
``graphs.client``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from graphs.cli_commands import batch_sizes, extras, generate, jobs, sizes
from graphs.client import TIMEOUT_S, CliError, ProgressBar, Service

DEFAULT_URL = "http://127.0.0.1:8000"
# 3 and 5 are graphs.client.UNREACHABLE and BUSY, 6 graphs.cli_commands.FLAGGED, 7 graphs.cli_files.UNSAVED.
EXIT_STATUSES = """exit status:
  0    done
  1    the job failed or was cancelled, or the service failed (a 5xx of its own)
  2    a bad request (the message names the field and the flag), or an -o
       that cannot be written or already exists (--force replaces it)
  3    the service cannot be reached, gave no answer within --timeout, or
       something else answered (a gateway's 502/504, a redirect, a page that
       is not the service's: check --url)
  4    unauthorized (--token or IMAGEGEN_TOKEN)
  5    busy: 429 or 503; the message says when to retry
  6    done, but the safety checker replaced an image (the replacement is saved)
  7    the job is done but its result could not be written (the message names
       the job: imagegen jobs wait ID -o OUT fetches it again)
  130  interrupted (Ctrl-C)"""


def _base_size(text: str) -> tuple[str, tuple[int, int]]:
    aspect, _, size = text.partition("=")
    if aspect not in ("landscape", "square", "portrait"):
        raise argparse.ArgumentTypeError(f"{text!r} is not landscape=WxH, square=WxH or portrait=WxH")
    return aspect, _size(size)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,5})(?:x(\d{1,5}))?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH (or one number for a square)")
    return int(match[1]), int(match[2] or match[1])


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    top = argparse.ArgumentParser(prog="imagegen", description="Generate and process images with the imagegen "
                                  "service.", epilog=EXIT_STATUSES, formatter_class=raw)
    top.add_argument("--url", default=os.environ.get("IMAGEGEN_URL", DEFAULT_URL), help="service URL "
                     "(IMAGEGEN_URL; default %(default)s)")
    top.add_argument("--token", default=os.environ.get("IMAGEGEN_TOKEN"), help="bearer token (IMAGEGEN_TOKEN)")
    top.add_argument("--timeout", type=_seconds, default=os.environ.get("IMAGEGEN_TIMEOUT", f"{TIMEOUT_S:g}"),
                     metavar="SECONDS", help="how long to wait for an answer (IMAGEGEN_TIMEOUT; default %(default)s)")
    top.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, more: str = "") -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.{more}",
                                   epilog=EXIT_STATUSES, formatter_class=raw)

    def output(cmd: argparse.ArgumentParser, what: str) -> None:
        cmd.add_argument("-o", "--output", required=True, metavar="OUT", help=what)
        cmd.add_argument("--force", action="store_true", help="replace an existing file")

    image = ("image file to write: .png as the service sends it; .jpg, .webp and other extensions are converted; "
             "- writes the image to stdout")

    gen = command("generate", "text to image, with a live progress bar", " Ctrl-C cancels the job.")
    gen.add_argument("prompt", help="what to draw")
    output(gen, image)
    gen.add_argument("--size", type=_size, help="WxH, or one number for a square (multiples of 8; default 512, "
                     "1024 with --faces)")
    gen.add_argument("--width", type=int, help="width in pixels (overrides --size)")
    gen.add_argument("--height", type=int, help="height in pixels (overrides --size)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: the service's)")
    gen.add_argument("--guidance", type=float, help="guidance scale: how closely to follow the prompt, 0..30 "
                     "(default: the service's)")
    gen.add_argument("--seed", type=int, help="a seed to repeat an image (default: random; the line printed names "
                     "it)")
    gen.add_argument("--negative", help="negative prompt: what to keep out")
    gen.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M Karras' (GET /sdapi/v1/samplers lists them)")
    gen.add_argument("--checkpoint", help="a base checkpoint or alias (GET /models lists them); default: the "
                     "service's")
    gen.add_argument("--hires", action="store_true", help="hires fix: renders 768x768, upscales it x2 and refines "
                     "it at 1536x1536 (takes no --size)")
    gen.add_argument("--faces", action="store_true", help="restore faces (CodeFormer)")
    gen.add_argument("--preview-every", type=int, metavar="STEPS", help="steps between the job's preview events")
    gen.set_defaults(run=generate)

    batch = command("batch-sizes", "one subject in several named sizes, from one base per aspect class",
                    " Ctrl-C cancels the job.")
    batch.add_argument("prompt", help="what to draw")
    batch.add_argument("--sizes", required=True, help="comma-separated size names (imagegen sizes lists them) or "
                       "WxH")
    output(batch, "folder for <size>.png")
    batch.add_argument("--negative", help="negative prompt: what to keep out")
    batch.add_argument("--checkpoint", help="a base checkpoint or alias (GET /models lists them); default: the "
                       "service's")
    batch.add_argument("--seed", type=int, help="one seed for every base (default: random)")
    batch.add_argument("--steps", type=int, help="denoising steps (default: the service's)")
    batch.add_argument("--guidance", type=float, help="guidance scale, 0..30 (default: the service's)")
    batch.add_argument("--base-size", type=_base_size, action="append", default=[], metavar="ASPECT=WxH",
                       help="the base rendered for an aspect class: landscape, square or portrait (repeatable; "
                       "default: the service's, imagegen sizes lists them)")
    batch.set_defaults(run=batch_sizes)

    named = command("sizes", "list the named sizes batch-sizes takes, and its bases")
    named.set_defaults(run=sizes)

    up = command("upscale", "upscale an image")
    up.add_argument("input", metavar="IN", help="image file to upscale (- reads stdin)")
    output(up, image)
    up.add_argument("--scale", type=float, default=2.0, help="how many times larger (default %(default)s)")
    up.add_argument("--upscaler", default="R-ESRGAN 4x+", help="upscaler name (default %(default)s; "
                    "GET /sdapi/v1/upscalers lists them)")
    up.set_defaults(run=extras)

    faces = command("faces", "restore the faces in an image")
    faces.add_argument("input", metavar="IN", help="image file (- reads stdin)")
    output(faces, image)
    faces.add_argument("--weight", type=float, default=0.6, help="CodeFormer fidelity, 0..1 (default %(default)s)")
    faces.set_defaults(run=extras)

    job = command("jobs", "list, show, cancel or wait for jobs", " Ctrl-C during wait stops waiting and leaves the "
                  "job running; cancel waits a few seconds for a running job to stop.")
    job.add_argument("action", choices=["list", "show", "cancel", "wait"], help="what to do")
    job.add_argument("id", nargs="?", help="the job's id (job_...), for show, cancel and wait")
    job.add_argument("--status", choices=["queued", "processing", "completed", "failed", "cancelled"],
                     help="list: only jobs in this state")
    job.add_argument("--limit", type=int, default=20, help="list: how many, newest first (at most 500; default "
                     "%(default)s)")
    job.add_argument("-o", "--output", metavar="OUT", help="wait: also write the result image here (a batch-sizes "
                     "job's: the folder for its <size>.png)")
    job.add_argument("--force", action="store_true", help="wait: replace existing files")
    job.set_defaults(run=jobs)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    service = Service(args.url, args.token, timeout=args.timeout)
    bar = ProgressBar(sys.stderr, args.quiet)
    try:
        return int(args.run(service, args, bar))
    except CliError as e:
        sys.stderr.write(f"imagegen: {e}\n")
        return e.status
    except KeyboardInterrupt:
        sys.stderr.write("imagegen: interrupted\n")
        return 130
    finally:
        service.http.close()


if __name__ == "__main__":
    sys.exit(main())
