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
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from graphs.client import TERMINAL, TIMEOUT_S, CliError, Event, ProgressBar, Service, finish, follow, terminal_event

DEFAULT_URL = "http://127.0.0.1:8000"
FLAGGED = 6  # the exit status of a job whose image the safety checker replaced
UNSAVED = 7  # the exit status when a result could not be written
CANCEL_WAIT_S = 5.0  # how long ``jobs cancel`` waits for a running job to stop
CANCEL_POLL_S = 0.25
STDIO = "-"  # stdin for an input image, stdout for an output image
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


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _image_format(output: str) -> str | None:
    """The Pillow format an ``-o`` is written in: None for a PNG (written as the service sent it), which is also
    what stdout and a name without an extension get."""
    suffix = Path(output).suffix.lower() if output != STDIO else ""
    if suffix in ("", ".png"):
        return None
    try:
        from PIL import Image
    except ImportError:
        raise CliError(f"-o {output}: writing {suffix} needs Pillow (pip install pillow); name a .png", 2) from None
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise CliError(f"-o {output}: cannot write {suffix} images (use .png, .jpg or .webp)", 2)
    return fmt


def _encoded(data: bytes, output: str) -> bytes:
    """The service's PNG in the format ``output``'s extension names (its metadata stays in the PNG alone)."""
    fmt = _image_format(output)
    if fmt is None:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        converted = image.convert("RGB") if fmt == "JPEG" and image.mode not in ("RGB", "L") else image
        out = io.BytesIO()
        try:
            converted.save(out, fmt)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot save a {image.mode} image as {fmt}: {e}") from None
    return out.getvalue()


def _put(output: str, data: bytes) -> None:
    """Write one image to ``output`` (``-``: stdout, as bytes) in the format its extension names."""
    data = _encoded(data, output)
    if output == STDIO:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        _write(Path(output), data)


def _check_output(output: str, folder: bool = False, force: bool = False) -> None:
    """Refuse an ``-o`` that the result could not be written to, or that would replace a file without
    ``--force``, before any work is asked for, not after a job has finished. Missing folders are fine: they are
    created when the result is written."""
    if output == STDIO:
        if folder:
            raise CliError("-o -: several images cannot go to stdout; name a folder for <size>.png", 2)
        if sys.stdout.isatty():
            raise CliError("-o -: stdout is a terminal; pipe it or name a file", 2)
        return
    path = Path(output)
    if folder and path.exists() and not path.is_dir():
        raise CliError(f"-o {path}: not a folder (the images go into it as <size>.png)", 2)
    if not folder:
        if path.is_dir():
            raise CliError(f"-o {path}: a folder; name the image file to write", 2)
        _image_format(output)
        if path.exists() and not force:
            raise CliError(f"-o {path}: exists (--force replaces it)", 2)
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CliError(f"-o {path}: not writable", 2)
        return
    parent = next(p for p in path.parents if p.exists())  # "." or "/" at worst
    if not parent.is_dir():
        raise CliError(f"-o {path}: {parent} is a file, not a folder", 2)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"-o {path}: cannot create files in {parent}", 2)


def _check_sizes(folder: str, names: list[str], force: bool) -> None:
    """A batch's folder, and none of its ``<size>.png`` there already unless ``--force``."""
    _check_output(folder, folder=True)
    taken = [f"{name}.png" for name in names if (Path(folder) / f"{name}.png").exists()]
    if taken and not force:
        raise CliError(f"-o {folder}: {', '.join(taken)} exist{'s' if len(taken) == 1 else ''} (--force replaces "
                       f"{'it' if len(taken) == 1 else 'them'})", 2)


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
        data = sys.stdin.buffer.read() if path == STDIO else Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from None
    if not data:
        raise CliError(f"cannot read {'stdin' if path == STDIO else path}: empty", 2)
    return base64.b64encode(data).decode()


def _save_result(service: Service, event: Event, output: str) -> None:
    """The image of a finished job to ``output``, and a line naming it, its size, the job and the seed (on stderr
    when the image itself went to stdout)."""
    job_id = str(event.data.get("job_id"))
    result = service.call("GET", f"/jobs/{job_id}/result")
    _put(output, base64.b64decode(result["imageData"]))
    seed = event.data.get("seed")
    line = f"{result['width']}x{result['height']} ({job_id}{f', seed {seed}' if seed is not None else ''})"
    if output == STDIO:
        sys.stderr.write(f"imagegen: stdout: {line}\n")
    else:
        sys.stdout.write(f"{output} {line}\n")


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
    if args.hires and (width or height):
        raise CliError("--hires renders 768x768 and refines it at 1536x1536; it takes no --size, --width or "
                       "--height", 2)
    _check_output(args.output, force=args.force)
    _check_choices(service, args)
    given = {"width": width, "height": height, "seed": args.seed, "preview_every": args.preview_every}
    if args.hires or args.faces:  # seed 000's plan: hires fix and face restoration
        body = {"prompt": args.prompt, "negative_prompt": args.negative, "num_inference_steps": args.steps,
                "guidance_scale": args.guidance, "hires_fix": args.hires, "use_face_restoration": args.faces,
                "model": args.checkpoint, **given}
        path = "/generate/async"
    else:
        body = {"prompt": args.prompt, "negativePrompt": args.negative, "steps": args.steps,
                "guidanceScale": args.guidance, "sampler": args.sampler, "model": args.checkpoint, **given}
        path = "/generate/text2img"
    event = follow(service, bar, submit=(path, {k: v for k, v in body.items() if v is not None}))
    job_id = finish(event)
    with _saving(job_id, args.output):
        _save_result(service, event, args.output)
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
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    body = {"prompt": args.prompt, "negativePrompt": args.negative, "sizes": sizes, "seed": args.seed,
            "steps": args.steps, "guidanceScale": args.guidance, "model": args.checkpoint,
            "baseSizes": dict(args.base_size) or None}
    _check_sizes(args.output, sizes, args.force)
    event = follow(service, bar, submit=("/generate/batch-sizes", {k: v for k, v in body.items() if v is not None}))
    job_id = finish(event)
    with _saving(job_id, args.output):
        flagged = _save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
    outcome = _outcome(event)
    return FLAGGED if flagged else outcome


def sizes(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    """The named sizes ``batch-sizes --sizes`` takes, and the base rendered for each aspect class."""
    config = service.call("GET", "/generate/batch-sizes")
    for name, size in config["sizes"].items():
        sys.stdout.write(f"{name:<16} {size['width']}x{size['height']:<6} {size['aspect']}\n")
    bases = ", ".join(f"{aspect} {w}x{h}" for aspect, (w, h) in config["bases"].items())
    sys.stdout.write(f"bases (one rendered per aspect class, --base-size overrides): {bases}\n")
    return 0


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
    _check_output(args.output, force=args.force)
    body: dict[str, Any] = {"image": _read_image(args.input)}
    if args.command == "upscale":
        body.update(upscaling_resize=args.scale, upscaler_1=args.upscaler)
    else:
        body.update(upscaling_resize=1.0, upscaler_1="None", codeformer_visibility=1.0, codeformer_weight=args.weight)
    answer = service.call("POST", "/sdapi/v1/extra-single-image", json=body)
    try:
        _put(args.output, base64.b64decode(answer["image"]))
    except OSError as e:
        raise CliError(f"cannot write {e.filename or args.output}: {e.strerror or e}", UNSAVED) from None
    if args.output != STDIO:
        sys.stdout.write(f"{args.output}\n")
    return 0


BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _shorten(value: Any) -> Any:
    """A job as JSON without multi-megabyte images: data URIs and long base64 strings become their length."""
    if isinstance(value, dict):
        return {k: _shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > 80:
        return f"<{value[5:value.find(';')]}, {len(value)} characters>"
    if isinstance(value, str) and len(value) > 200 and BASE64.fullmatch(value):
        return f"<base64, {len(value)} characters>"
    return value


def _cancel(service: Service, job_id: str) -> str:
    """Cancel a job; a running one stops at its next step, so its end is waited for a few seconds."""
    status = service.call("POST", f"/jobs/{job_id}/cancel")["status"]
    deadline = time.monotonic() + CANCEL_WAIT_S
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(CANCEL_POLL_S)
        status = service.call("GET", f"/jobs/{job_id}", params={"images": "false"})["status"]
    if status == "cancelled":
        return f"{job_id}: cancelled"
    if status in TERMINAL:
        return f"{job_id}: {status} before the cancel took effect"
    return f"{job_id}: cancel requested; still {status} (it stops at its next step: imagegen jobs wait {job_id})"


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
    if args.action == "show":  # images by URL: a batch's sizes would be megabytes of base64
        view = service.call("GET", f"/jobs/{args.id}", params={"images": "false"})
        sys.stdout.write(json.dumps(_shorten(view), indent=2) + "\n")
    elif args.action == "cancel":
        sys.stdout.write(_cancel(service, args.id) + "\n")
    else:
        return _wait(service, args, bar)
    return 0


def _wait(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    """Follow a job to its end (a finished one is not replayed: its final state alone), and save its result."""
    try:
        job: dict | None = service.call("GET", f"/jobs/{args.id}", params={"images": "false"})
    except CliError as e:
        if e.status != 5:  # busy: the stream's own polling copes with it
            raise
        job = None
    # A batch-sizes job has an image per size: -o is then the folder for them, as for batch-sizes.
    batch = job is not None and job.get("type") == "batch-sizes"
    if args.output and job is not None and batch:
        _check_sizes(args.output, list((job.get("request") or {}).get("sizes") or []), args.force)
    elif args.output:
        _check_output(args.output, force=args.force)
    event = terminal_event(job) if job is not None else None
    if event is not None:
        bar.show(event)
    else:
        event = follow(service, bar, job_id=args.id)
    job_id, flagged = finish(event), False
    if args.output:
        with _saving(job_id, args.output):
            if batch:
                flagged = _save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
            else:
                _save_result(service, event, args.output)
    outcome = _outcome(event)
    return FLAGGED if flagged else outcome


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
