"""``python -m deployments.weights.convert IN OUT``: an official ``.pth`` release -> safetensors the loader takes.

Real-ESRGAN, CodeFormer, GFPGAN and RetinaFace weights ship as pickles, as do ControlNet's line-art, pose, soft-edge and
M-LSD preprocessors (lllyasviel/Annotators' sk_model.pth, sk_model2.pth, netG.pth, body_pose_model.pth,
hand_pose_model.pth, facenet.pth, ControlNetHED.pth, table5_pidinet.pth, mlsd_large_512_fp32.pth), which the loader
refuses because unpickling can run code. This reads them with PyTorch's restricted unpickler only (tensors, containers
and primitives; anything else is refused, never retried unrestricted), unwraps the usual checkpoint dicts
(``params_ema`` first), strips DataParallel's ``module.`` prefix, recognises the model, writes safetensors to a
temporary name, loads that through the service's own loader, and only then renames it into place.

IN may be a directory: every ``.pth`` / ``.ckpt`` / ``.pt`` / ``.bin`` in it is converted into the OUT directory.
Each converted file prints one line: path, architecture, purpose, scale and the SHA-256 of the written file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deployments.support.errors import ModelLoadError, UnsafeWeights

logger = logging.getLogger(__name__)

CONVERTIBLE = (".pth", ".ckpt", ".pt", ".bin")
# Checkpoint wrappers, most preferred first: basicsr files hold both params and params_ema, and the EMA
# weights are the ones released for inference.
WRAPPERS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net", "g_ema")
RETINAFACE_HEADS = ("ClassHead.", "BboxHead.", "LandmarkHead.")


@dataclass(frozen=True)
class Identity:
    architecture: str
    purpose: str  # spandrel's purpose (SR, FaceSR, Restoration, ...), FaceDetection, preprocessor, or unknown
    scale: int | None  # None where the model does not resize (a detector) or is not known


@dataclass(frozen=True)
class Report:
    source: str
    output: str
    architecture: str
    purpose: str
    scale: int | None
    tensors: int
    sha256: str


def read_checkpoint(path: Path) -> Any:
    """Unpickle with PyTorch's restricted unpickler; a pickle that needs any other global is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # PyTorch's message advises retrying with weights_only=False; keep only the reason it refused.
        reason = str(e).partition("WeightsUnpickler error: ")[2] or str(e)
        reason = reason.split(". Please use")[0].strip().splitlines()[0]
        raise UnsafeWeights(
            f"{path.name}: refused by the restricted unpickler ({reason}); it is not a plain tensor checkpoint "
            "and was not loaded",
            field="source",
        ) from e
    except Exception as e:  # a malformed stream surfaces as KeyError, IndexError, EOFError, zip errors, ...
        raise ModelLoadError(f"{path.name}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})",
                             field="source") from e


def _unwrap(obj: Any, name: str) -> dict:
    # A few levels at most: e.g. {"state_dict": {"model": {...}}} from training frameworks.
    for _ in range(4):
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{name}: holds a {type(obj).__name__}, not a state dict", field="source")
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            inner = next(iter(obj.values()))  # a single unnamed wrapper, as spandrel also accepts
        if inner is None:
            return obj
        obj = inner
    return obj


def extract_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's state dict, ``module.`` stripped, each a contiguous copy of its own."""
    state: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in _unwrap(obj, name).items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            skipped.append(str(key))  # step counters, optimiser state, configs: not weights
            continue
        clean = key.removeprefix("module.")
        if clean in state:
            raise ModelLoadError(f"{name}: keys {key!r} and {clean!r} collide once 'module.' is removed",
                                 field="source")
        # safetensors refuses tensors that share storage (tied weights, views): every tensor gets its own.
        state[clean] = value.detach().clone(memory_format=torch.contiguous_format)
    if skipped:
        logger.info("%s: ignored %d non-tensor entries (%s)", name, len(skipped), ", ".join(skipped[:5]))
    if not state:
        raise ModelLoadError(f"{name}: no tensors found; not a model state dict", field="source")
    return state


def retinaface_network(state: dict[str, torch.Tensor]) -> str | None:
    """facexlib's RetinaFace network name for this state dict, or None when it is not RetinaFace."""
    if not all(any(k.startswith(head) for k in state) for head in RETINAFACE_HEADS + ("body.",)):
        return None
    # The same test deployments/support/faces.py uses: MobileNet's stages versus ResNet's layers.
    return "mobile0.25" if any(k.startswith("body.stage1.") for k in state) else "resnet50"


def identify(state: dict[str, torch.Tensor], name: str, allow_unknown: bool = False) -> Identity:
    """What the state dict is: a RetinaFace detector, a ControlNet line-art network, OpenPose's body network, a
    soft-edge network (HED, PiDiNet) or M-LSD's large network by its keys, else whatever spandrel recognises."""
    from deployments.support import lineart_nets, mlsd, pose, pose_parts, softedge_nets

    network = retinaface_network(state)
    if network is not None:
        return Identity(f"RetinaFace-{network}", "FaceDetection", None)
    drawing = lineart_nets.architecture(state)  # lineart (sk_model*.pth) or lineart_anime (netG.pth)
    if drawing is not None:
        return Identity(drawing, "preprocessor", None)
    if pose.recognise(state):  # body_pose_model.pth: every key of the release, each of its shape
        return Identity("openpose", "preprocessor", None)
    for part in ("hand", "face"):  # hand_pose_model.pth, facenet.pth: the same
        if pose_parts.recognise(part, state):
            return Identity(f"openpose-{part}", "preprocessor", None)
    edges = softedge_nets.architecture(state)  # hed (ControlNetHED.pth) or pidinet (table5_pidinet.pth)
    if edges is not None:
        return Identity(edges, "preprocessor", None)
    if mlsd.recognise(state):  # mlsd_large_512_fp32.pth: every key of the release, each of its shape
        return Identity("mlsd", "preprocessor", None)
    import spandrel  # imported only for what it recognises: spandrel_extra_arches takes seconds to import
    import spandrel_extra_arches

    spandrel_extra_arches.install(ignore_duplicates=True)  # CodeFormer lives there
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        if allow_unknown:
            logger.warning("%s: architecture not recognised; converted as is (--allow-unknown)", name)
            return Identity("unknown", "unknown", None)
        raise ModelLoadError(
            f"{name}: not a recognised upscaler, face restorer, face detector, line-art, pose, soft-edge or M-LSD "
            "network; pass --allow-unknown to convert it anyway", field="source"
        ) from None
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise ModelLoadError(f"{name}: looks like a known architecture but does not load ({e})",
                             field="source") from e
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelLoadError(f"{name}: {descriptor.architecture.id} is not an image-to-image model the service runs",
                             field="source")
    return Identity(descriptor.architecture.id, descriptor.purpose, descriptor.scale)


def verify(path: Path, identity: Identity) -> None:
    """Load the written file the way the service will; a file that fails here is never published."""
    from deployments.support import faces, softedge
    from deployments.support.lineart import ARCHITECTURES
    from deployments.weights import loader

    if identity.purpose == "preprocessor" and identity.architecture == "openpose":  # strict, as a replica loads it
        loader.load_pose(str(path))
    elif identity.purpose == "preprocessor" and identity.architecture.startswith("openpose-"):  # hand, face: strict
        loader.load_pose(str(path), network=identity.architecture.removeprefix("openpose-"))
    elif identity.purpose == "preprocessor" and identity.architecture in softedge.WEIGHTS:  # hed, pidinet: strict
        loader.load_softedge(str(path), next(m for m, kind in softedge.ARCHITECTURES.items()
                                             if kind == identity.architecture))
    elif identity.purpose == "preprocessor" and identity.architecture == "mlsd":
        loader.load_mlsd(str(path))
    elif identity.purpose == "preprocessor":  # strict: every name and shape of the network, as a replica loads it
        module = next(m for m, kind in ARCHITECTURES.items() if kind == identity.architecture)
        loader.load_lineart(str(path), module)
    elif identity.purpose == "FaceDetection":
        try:
            faces.RetinaFaceDetector(str(path), device="cpu")  # strict load into facexlib's RetinaFace
        except (RuntimeError, KeyError, ValueError) as e:
            raise ModelLoadError(f"{path.name}: does not load into facexlib's RetinaFace ({e})",
                                 field="source") from e
    elif identity.architecture == "unknown":
        loader.check_safetensors(path)
    else:
        descriptor = loader.load_spandrel(str(path))
        if descriptor.architecture.id != identity.architecture:
            raise ModelLoadError(f"{path.name}: reloads as {descriptor.architecture.id}, "
                                 f"not {identity.architecture}", field="output")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write(state: dict[str, torch.Tensor], part: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(part), metadata=metadata)
        # safetensors creates files owner-only (0600); a serving user other than the converting one must read it.
        part.chmod(0o644)
        with part.open("rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{part.name}: cannot write ({e})", field="output") from e


def _publish(part: Path, output: Path) -> None:
    try:
        os.replace(part, output)  # atomic: readers see no file or the whole verified one
    except OSError as e:
        raise ModelLoadError(f"{output}: cannot rename into place ({e})", field="output") from e


def convert_file(source: Path, output: Path, *, allow_unknown: bool = False) -> Report:
    """Convert one checkpoint; the output appears whole and verified, or not at all."""
    if output.suffix != ".safetensors":
        raise ModelLoadError(f"{output}: the output must end in .safetensors", field="output")
    state = extract_state_dict(read_checkpoint(source), source.name)
    identity = identify(state, source.name, allow_unknown)
    metadata = {
        "format": "pt",
        "source": source.name,
        "architecture": identity.architecture,
        "purpose": identity.purpose,
        "scale": str(identity.scale or ""),
        "converted_by": "deployments.weights.convert",
    }
    # The temporary name keeps the suffix: the loader that verifies it accepts only .safetensors.
    part = output.with_name(f".{output.stem}.part-{os.getpid()}.safetensors")
    try:
        _write(state, part, metadata)
        verify(part, identity)
        _publish(part, output)
    finally:
        part.unlink(missing_ok=True)
    return Report(str(source), str(output), identity.architecture, identity.purpose, identity.scale,
                  len(state), sha256_of(output))


def plan(source: Path, output: Path) -> list[tuple[Path, Path]]:
    """(checkpoint, safetensors) pairs: one file, or every checkpoint directly inside a directory."""
    if source.is_dir():
        if output.suffix == ".safetensors":
            raise ModelLoadError(f"{output}: a directory of checkpoints needs an output directory", field="output")
        found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in CONVERTIBLE)
        if not found:
            raise ModelLoadError(f"{source}: no {', '.join(CONVERTIBLE)} files to convert", field="source")
        return [(p, output / f"{p.stem}.safetensors") for p in found]
    if not source.is_file():
        raise ModelLoadError(f"{source}: no such file or directory", field="source")
    if output.is_dir() or not output.suffix:  # "models/upscalers/" need not exist yet
        return [(source, output / f"{source.stem}.safetensors")]
    return [(source, output)]


def describe(report: Report) -> str:
    scale = f"x{report.scale}" if report.scale else "-"
    return (f"{report.output} architecture={report.architecture} purpose={report.purpose} scale={scale} "
            f"sha256={report.sha256}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("source", type=Path, help="a .pth/.ckpt/.pt/.bin file, or a directory of them")
    parser.add_argument("output", type=Path, help="the .safetensors file (or directory) to write")
    parser.add_argument("--allow-unknown", action="store_true", help="convert state dicts of unknown models too")
    parser.add_argument("--json", action="store_true", help="print one JSON report instead of one line per file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        pairs = plan(args.source.expanduser(), args.output.expanduser())
    except ModelLoadError as e:
        logger.error("%s", e)
        return 1
    converted, refused = [], []
    for source, output in pairs:  # one bad file does not stop the others; the exit status still says so
        try:
            report = convert_file(source, output, allow_unknown=args.allow_unknown)
        except ModelLoadError as e:
            logger.error("%s [%s]", e, e.code)
            refused.append({"source": str(source), "code": e.code, "error": e.message})
            continue
        converted.append(report)
        if not args.json:
            sys.stdout.write(describe(report))
    if args.json:
        sys.stdout.write(json.dumps({"converted": [asdict(r) for r in converted], "refused": refused}, indent=2))
        sys.stdout.write("\n")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
