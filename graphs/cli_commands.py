"""The ``imagegen`` commands, one runner each: ``run(service, args, bar) -> exit status``, set as the subcommand's
``run`` default by ``graphs.cli.parser``. They check their ``-o`` first (``graphs.cli_files``), then submit and follow
the job (``graphs.client``) and save its result.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from graphs.cli_files import STDIO, UNSAVED, check_output, check_sizes, put, read_image, save_result, save_sizes, saving
from graphs.client import TERMINAL, CliError, Event, ProgressBar, Service, finish, follow, terminal_event

FLAGGED = 6  # the exit status of a job whose image the safety checker replaced
CANCEL_WAIT_S = 5.0  # how long ``jobs cancel`` waits for a running job to stop
CANCEL_POLL_S = 0.25


def _check_choices(service: Service, args: argparse.Namespace) -> None:
    """Sampler names are checked before a job is queued, so a typo is a usage error, not a job that fails a
    minute later (the service itself refuses an unknown checkpoint when the job is submitted)."""
    if args.sampler:
        listed = service.call("GET", "/sdapi/v1/samplers")
        names = [s["name"] for s in listed]
        if args.sampler.lower() not in {n.lower() for s in listed for n in (s["name"], *(s.get("aliases") or []))}:
            raise CliError(f"unknown sampler {args.sampler!r} (choices: {', '.join(names)})", 2)


def generate(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    width, height = args.size or (None, None)
    width, height = args.width or width, args.height or height
    if args.sampler and (args.hires or args.faces):
        raise CliError("--sampler applies to plain generations; --hires and --faces use the configured sampler", 2)
    if args.hires and (width or height):
        raise CliError("--hires renders 768x768 and refines it at 1536x1536; it takes no --size, --width or "
                       "--height", 2)
    check_output(args.output, force=args.force)
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
    with saving(job_id, args.output):
        save_result(service, event, args.output)
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
    check_sizes(args.output, sizes, args.force)
    event = follow(service, bar, submit=("/generate/batch-sizes", {k: v for k, v in body.items() if v is not None}))
    job_id = finish(event)
    with saving(job_id, args.output):
        flagged = save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
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


def extras(service: Service, args: argparse.Namespace, bar: ProgressBar) -> int:
    check_output(args.output, force=args.force)
    body: dict[str, Any] = {"image": read_image(args.input)}
    if args.command == "upscale":
        body.update(upscaling_resize=args.scale, upscaler_1=args.upscaler)
    else:
        body.update(upscaling_resize=1.0, upscaler_1="None", codeformer_visibility=1.0, codeformer_weight=args.weight)
    answer = service.call("POST", "/sdapi/v1/extra-single-image", json=body)
    try:
        put(args.output, base64.b64decode(answer["image"]))
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
    def check(job: dict) -> bool:
        """Check -o for ``job``; whether it is a batch-sizes job, whose -o is the folder for its sizes."""
        batch = job.get("type") == "batch-sizes"
        if batch:
            check_sizes(args.output, list((job.get("request") or {}).get("sizes") or []), args.force)
        else:
            check_output(args.output, force=args.force)
        return batch

    batch = check(job) if args.output and job is not None else False
    event = terminal_event(job) if job is not None else None
    if event is not None:
        bar.show(event)
    else:
        event = follow(service, bar, job_id=args.id)
    job_id, flagged = finish(event), False
    if args.output and job is None:  # the first look was refused as busy: the job's kind is learnt now
        batch = check(service.call("GET", f"/jobs/{job_id}", params={"images": "false"}))
    if args.output:
        with saving(job_id, args.output):
            if batch:
                flagged = save_sizes(service.call("GET", f"/jobs/{job_id}"), Path(args.output))
            else:
                save_result(service, event, args.output)
    outcome = _outcome(event)
    return FLAGGED if flagged else outcome
