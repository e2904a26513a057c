"""``imagegen``: the service from a shell. Each command maps onto the HTTP routes a client already has, so the
CLI needs nothing but ``httpx`` (it never imports torch, Ray or diffusers and runs on any laptop):

- ``generate``: a seed 003 text2img job (``--sampler``, ``--checkpoint``), or a seed 000 ``/generate/async`` job
  when ``--hires`` or ``--faces`` asks for that plan; both submitted with ``Accept: text/event-stream`` so the
  progress bar follows the job's own events, then the image from ``/jobs/{id}/result``.
- ``batch-sizes``: seed 002's ``/generate/batch-sizes``; every size written to a folder.
- ``upscale`` and ``faces``: Automatic1111's ``/sdapi/v1/extra-single-image``.
- ``jobs list|show|cancel|wait``: the jobs routes; ``wait`` follows ``/jobs/{id}/events``.

Server and token: ``--url`` / ``--token`` or ``IMAGEGEN_URL`` / ``IMAGEGEN_TOKEN``. Failures are one line on
stderr and an exit status: 1 the job failed or was cancelled, 2 a bad request (the service names the field) or an
``-o`` that cannot be written, 3 the service cannot be reached, 4 unauthorized, 5 busy (429 / 503, with the
service's Retry-After), 7 the result could not be written (the job's id is in the message).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graphs.client import CliError, Event, ProgressBar, Service, finish, follow

DEFAULT_URL = "http://127.0.0.1:8000"
FLAGGED = 6  # the exit status of a job whose image the safety checker replaced
UNSAVED = 7  # the exit status when a result could not be written


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _check_output(path: Path, folder: bool = False) -> None:
    """Refuse an ``-o`` that the result could not be written to before any work is asked for, not after a job
    has finished. Missing folders are fine: they are created when the result is written."""
    if folder and path.exists() and not path.is_dir():
        raise CliError(f"-o {path}: not a folder (the images go into it as <size>.png)", 2)
    if not folder and path.is_dir():
        raise CliError(f"-o {path}: a folder; name the PNG file to write", 2)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CliError(f"-o {path}: not writable", 2)
        return
    parent = next(p for p in path.parents if p.exists())  # "." or "/" at worst
    if not parent.is_dir():
        raise CliError(f"-o {path}: {parent} is a file, not a folder", 2)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"-o {path}: cannot create files in {parent}", 2)


@contextmanager
def _saving(job_id: str, output: str) -> Iterator[None]:
    """Errors while a finished job's result is fetched and written name the job and how to fetch it again."""
    try:
        yield
    except CliError as e:
        raise e.about(job_id) from None
    except OSError as e:
        raise CliError(f"cannot write {e.filename or output}: {e.strerror or e}; job {job_id} is done: imagegen "
                       f"jobs wait {job_id} -o PATH saves it", UNSAVED) from None


def _read_image(path: str) -> str:
    try:
        return base64.b64encode(Path(path).read_bytes()).decode()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from None


def _save_result(service: Service, job_id: str, out: Path) -> None:
    result = service.call("GET", f"/jobs/{job_id}/result")
    _write(out, base64.b64decode(result["imageData"]))
    sys.stdout.write(f"{out} {result['width']}x{result['height']} ({job_id})\n")


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


# --- the commands -------------------------------------------------------------------------------------------------

def _check_choices(service: Service, args: argparse.Namespace) -> None:
    """Sampler names are checked before a job is queued, so a typo is a usage error, not a job that fails a
    minute later (the service itself refuses an unknown checkpoint when the job is submitted)."""
    if args.sampler:
        names = [s["name"] for s in service.call("GET", "/sdapi/v1/samplers")]
        if args.sampler.lower() not in {n.lower() for n in names}:
            raise CliError(f"unknown sampler {args.sampler!r} (choices: {', '.join(names)})", 2)


def generate(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    width, height = args.size or (None, None)
    width, height = args.width or width, args.height or height
    if args.sampler and (args.hires or args.faces):
        raise CliError("--sampler applies to plain generations; --hires and --faces use the configured sampler", 2)
    _check_choices(service, args)
    _check_output(Path(args.output))
    given = {"width": width, "height": height, "seed": args.seed, "preview_every": args.preview_every}
    if args.hires or args.faces:  # seed 000's plan: hires fix and face restoration
        body = {"prompt": args.prompt, "negative_prompt": args.negative, "num_inference_steps": args.steps,
                "hires_fix": args.hires, "use_face_restoration": args.faces, "model": args.checkpoint, **given}
        path = "/generate/async"
    else:
        body = {"prompt": args.prompt, "negativePrompt": args.negative, "steps": args.steps,
                "sampler": args.sampler, "model": args.checkpoint, **given}
        path = "/generate/text2img"
    event = follow(service, bar, submit=(path, {k: v for k, v in body.items() if v is not None}))
    job_id = finish(event)
    with _saving(job_id, args.output):
        _save_result(service, job_id, Path(args.output))
    return _outcome(event)


def _outcome(event: Event) -> int:
    """The warnings of a completed job on stderr; ``FLAGGED`` when the safety checker replaced an image (the file
    saved is then its replacement), else 0."""
    job = event.data.get("job_id", "?")
    for warning in event.data.get("warnings") or []:
        sys.stderr.write(f"imagegen: {job}: {warning}\n")
    flags = event.data.get("nsfw")
    return FLAGGED if (any(flags) if isinstance(flags, list) else bool(flags)) else 0


def batch_sizes(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    body = {"prompt": args.prompt, "sizes": [s.strip() for s in args.sizes.split(",") if s.strip()],
            "seed": args.seed, "steps": args.steps, "baseSizes": dict(args.base_size) or None}
    _check_output(Path(args.output), folder=True)
    event = follow(service, bar, submit=("/generate/batch-sizes", {k: v for k, v in body.items() if v is not None}))
    job_id = finish(event)
    with _saving(job_id, args.output):
        flagged = _save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
    outcome = _outcome(event)
    return FLAGGED if flagged else outcome


def _save_sizes(job: dict, folder: Path) -> bool:
    """Every size of a finished batch-sizes job as ``<size>.png`` in ``folder``; True when any was flagged. A size
    whose image can no longer be read (gone, or the store down) fails the command, naming it, once the others
    are saved."""
    unreadable = [name for name, image in job["images"].items() if image["imageData"] is None]
    for name, image in job["images"].items():
        if name not in unreadable:
            out = folder / f"{name}.png"
            _write(out, base64.b64decode(image["imageData"].split(",", 1)[-1]))
            sys.stdout.write(f"{out} {image['width']}x{image['height']}\n")
    if unreadable:  # the job's warnings say why
        raise CliError(f"{job['id']}: {', '.join(unreadable)} could not be read; see GET /jobs/{job['id']}")
    return any(image.get("nsfw") for image in job["images"].values())


def extras(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    body: dict[str, Any] = {"image": _read_image(args.input)}
    _check_output(Path(args.output))
    if args.command == "upscale":
        body.update(upscaling_resize=args.scale, upscaler_1=args.upscaler)
    else:
        body.update(upscaling_resize=1.0, upscaler_1="None", codeformer_visibility=1.0, codeformer_weight=args.weight)
    answer = service.call("POST", "/sdapi/v1/extra-single-image", json=body)
    try:
        _write(Path(args.output), base64.b64decode(answer["image"]))
    except OSError as e:
        raise CliError(f"cannot write {e.filename or args.output}: {e.strerror or e}", UNSAVED) from None
    sys.stdout.write(f"{args.output}\n")
    return 0


def _shorten(value: Any) -> Any:
    """A job as JSON without its multi-megabyte data URIs."""
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > 80:
        return f"<{value[5:value.find(';')]}, {len(value)} characters>"
    return value


def jobs(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    if args.action == "list":
        params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
        listing = service.call("GET", "/jobs", params=params)
        for job in listing["jobs"]:
            sys.stdout.write(f"{job['id']}  {job['type']:<14} {job['status']:<10} {job['progress']:>3}%  "
                             f"{job['createdAt']}\n")
        return 0
    if not args.id:
        raise CliError(f"jobs {args.action} needs a job id", 2)
    if args.action == "show":
        sys.stdout.write(json.dumps(_shorten(service.call("GET", f"/jobs/{args.id}")), indent=2) + "\n")
    elif args.action == "cancel":
        answer = service.call("POST", f"/jobs/{args.id}/cancel")
        sys.stdout.write(f"{answer['id']}: {answer['status']}\n")
    else:
        # A batch-sizes job has an image per size: -o is then the folder for them, as for batch-sizes.
        sizes = bool(args.output) and service.call("GET", f"/jobs/{args.id}")["type"] == "batch-sizes"
        if args.output:
            _check_output(Path(args.output), folder=sizes)
        event = follow(service, bar, job_id=args.id)
        job_id, flagged = finish(event), False
        if args.output:
            with _saving(job_id, args.output):
                if sizes:
                    flagged = _save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
                else:
                    _save_result(service, job_id, Path(args.output))
        outcome = _outcome(event)
        return FLAGGED if flagged else outcome
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="imagegen", description="Generate and process images with the imagegen "
                                  "service.")
    top.add_argument("--url", default=os.environ.get("IMAGEGEN_URL", DEFAULT_URL), help="service URL "
                     "(IMAGEGEN_URL; default %(default)s)")
    top.add_argument("--token", default=os.environ.get("IMAGEGEN_TOKEN"), help="bearer token (IMAGEGEN_TOKEN)")
    top.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    commands = top.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="text to image, with a live progress bar")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", required=True, help="PNG file to write")
    gen.add_argument("--size", type=_size, help="WxH, or one number for a square")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--sampler", help="A1111 sampler name, e.g. 'DPM++ 2M Karras'")
    gen.add_argument("--checkpoint", help="a base checkpoint or alias (see GET /models); default: the service's")
    gen.add_argument("--hires", action="store_true", help="hires fix: 768 base, x2 upscale, refiner at 1536")
    gen.add_argument("--faces", action="store_true", help="restore faces (CodeFormer)")
    gen.add_argument("--preview-every", type=int, help="steps between the job's preview events")
    gen.set_defaults(run=generate)

    batch = commands.add_parser("batch-sizes", help="one subject in several named sizes (seed 002)")
    batch.add_argument("prompt")
    batch.add_argument("--sizes", required=True, help="comma-separated names from configs/sizes.yaml or WxH")
    batch.add_argument("-o", "--output", required=True, help="folder for <size>.png")
    batch.add_argument("--seed", type=int)
    batch.add_argument("--steps", type=int)
    batch.add_argument("--base-size", type=_base_size, action="append", default=[],
                       help="ASPECT=WxH: the base rendered for that aspect class (default configs/sizes.yaml)")
    batch.set_defaults(run=batch_sizes)

    up = commands.add_parser("upscale", help="upscale an image")
    up.add_argument("input", metavar="IN")
    up.add_argument("-o", "--output", required=True)
    up.add_argument("--scale", type=float, default=2.0)
    up.add_argument("--upscaler", default="R-ESRGAN 4x+", help="A1111 upscaler name (default %(default)s)")
    up.set_defaults(run=extras)

    faces = commands.add_parser("faces", help="restore the faces in an image")
    faces.add_argument("input", metavar="IN")
    faces.add_argument("-o", "--output", required=True)
    faces.add_argument("--weight", type=float, default=0.6, help="CodeFormer fidelity, 0..1 (default %(default)s)")
    faces.set_defaults(run=extras)

    job = commands.add_parser("jobs", help="list, show, cancel or wait for jobs")
    job.add_argument("action", choices=["list", "show", "cancel", "wait"])
    job.add_argument("id", nargs="?")
    job.add_argument("--status", choices=["queued", "processing", "completed", "failed", "cancelled"])
    job.add_argument("--limit", type=int, default=20)
    job.add_argument("-o", "--output", help="wait: also write the result PNG here (a batch-sizes job's: the folder "
                     "for its <size>.png)")
    job.set_defaults(run=jobs)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    service = Service(args.url, args.token)
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
