"""Where the ``imagegen`` CLI reads and writes images: its ``-o`` checks, made before any work is asked for
(``--force``, ``-`` for stdout, folders for ``batch-sizes``), the writing itself (a PNG as the service sent it,
other extensions converted with Pillow, imported only then), and the errors of a finished job's result that
could not be saved, which name the job and how to fetch it again (``UNSAVED``). ``-`` is stdin for an input
image and stdout for a single output image.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from graphs.client import CliError, Event, Service

UNSAVED = 7  # the exit status when a result could not be written
STDIO = "-"  # stdin for an input image, stdout for an output image


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


def put(output: str, data: bytes) -> None:
    """Write one image to ``output`` (``-``: stdout, as bytes) in the format its extension names."""
    data = _encoded(data, output)
    if output == STDIO:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        _write(Path(output), data)


def check_output(output: str, folder: bool = False, force: bool = False) -> None:
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


def check_sizes(folder: str, names: list[str], force: bool) -> None:
    """A batch's folder, and none of its ``<size>.png`` there already unless ``--force``."""
    check_output(folder, folder=True)
    taken = [f"{name}.png" for name in names if (Path(folder) / f"{name}.png").exists()]
    if taken and not force:
        raise CliError(f"-o {folder}: {', '.join(taken)} exist{'s' if len(taken) == 1 else ''} (--force replaces "
                       f"{'it' if len(taken) == 1 else 'them'})", 2)


@contextmanager
def saving(job_id: str, output: str) -> Iterator[None]:
    """Errors while a finished job's result is fetched and written name the job and how to fetch it again."""
    try:
        yield
    except CliError as e:
        raise e.about(job_id) from None
    except OSError as e:
        raise CliError(f"cannot write {e.filename or output}: {e.strerror or e}; job {job_id} is done: imagegen "
                       f"jobs wait {job_id} -o PATH saves it", UNSAVED) from None


def read_image(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == STDIO else Path(path).read_bytes()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from None
    if not data:
        raise CliError(f"cannot read {'stdin' if path == STDIO else path}: empty", 2)
    return base64.b64encode(data).decode()


def save_result(service: Service, event: Event, output: str) -> None:
    """The image of a finished job to ``output``, and a line naming it, its size, the job and the seed (on stderr
    when the image itself went to stdout)."""
    job_id = str(event.data.get("job_id"))
    result = service.call("GET", f"/jobs/{job_id}/result")
    put(output, base64.b64decode(result["imageData"]))
    seed = event.data.get("seed")
    line = f"{result['width']}x{result['height']} ({job_id}{f', seed {seed}' if seed is not None else ''})"
    if output == STDIO:
        sys.stderr.write(f"imagegen: stdout: {line}\n")
    else:
        sys.stdout.write(f"{output} {line}\n")



def save_sizes(job: dict, folder: Path) -> bool:
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
