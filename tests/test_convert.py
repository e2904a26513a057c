"""deployments.weights.convert: official .pth releases become safetensors the service loads; unsafe pickles never run.

The release files come from deployments.factory.releases in the official layouts (toy-sized where the loaders
allow). Conversions are done once per module: GFPGAN and RetinaFace ResNet-50 are full size even here.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from deployments.factory.releases import TOY, build_release_files, rrdbnet_state
from deployments.support import faces
from deployments.support.errors import ModelLoadError, UnsafeWeights
from deployments.weights import loader
from deployments.weights.convert import Report, convert_file, extract_state_dict, main, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Release -> (architecture, purpose, scale) as the converter reports them (spandrel's own words for its models).
EXPECTED = {
    "RealESRGAN_x4plus": ("ESRGAN", "SR", 4),
    "RealESRGAN_x2plus": ("ESRGAN", "SR", 2),
    "codeformer": ("CodeFormer", "FaceSR", 1),
    "GFPGANv1.4": ("GFPGAN", "FaceSR", 1),
    "detection_Resnet50_Final": ("RetinaFace-resnet50", "FaceDetection", None),
    "detection_mobilenet0.25_Final": ("RetinaFace-mobile0.25", "FaceDetection", None),
}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    return build_release_files(tmp_path_factory.mktemp("releases"), full=False)


@pytest.fixture(scope="module")
def converted(releases, tmp_path_factory) -> dict[str, Report]:
    out = tmp_path_factory.mktemp("converted")
    return {name: convert_file(path, out / f"{path.stem}.safetensors") for name, path in releases.items()}


def output(converted: dict[str, Report], name: str) -> Path:
    return Path(converted[name].output)


def test_every_release_converts_and_is_recognised(converted):
    assert set(converted) == set(EXPECTED)
    for name, report in converted.items():
        assert (report.architecture, report.purpose, report.scale) == EXPECTED[name]
        path = Path(report.output)
        assert report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        assert metadata["source"] == f"{name}.pth"
        assert metadata["architecture"] == report.architecture
        assert not list(path.parent.glob(".*part*")), "no temporary file is left behind"


@pytest.mark.parametrize(("name", "side"), [("RealESRGAN_x4plus", 128), ("RealESRGAN_x2plus", 64)])
def test_upscalers_load_through_the_loader_and_upscale(converted, name, side):
    descriptor = loader.load_spandrel(str(output(converted, name)))
    assert (descriptor.architecture.id, descriptor.purpose, descriptor.scale) == EXPECTED[name]
    with torch.inference_mode():
        upscaled = descriptor(torch.rand(1, 3, 32, 32))
    assert upscaled.shape == (1, 3, side, side)


@pytest.mark.parametrize("name", ["codeformer", "GFPGANv1.4"])
def test_face_restorers_load_through_the_loader(converted, name):
    descriptor = loader.load_spandrel(str(output(converted, name)))
    assert (descriptor.architecture.id, descriptor.purpose, descriptor.scale) == EXPECTED[name]
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    # Both restore 512x512 FFHQ-aligned crops: CodeFormer only exactly that, GFPGAN at least that.
    requirements = descriptor.size_requirements
    assert requirements.check(512, 512)
    assert not requirements.check(256, 256)


@pytest.mark.parametrize("name", ["detection_Resnet50_Final", "detection_mobilenet0.25_Final"])
def test_retinaface_loads_into_the_detector_and_runs(converted, name):
    from skimage.data import astronaut

    detector = faces.RetinaFaceDetector(str(output(converted, name)), device="cpu")
    found = detector.detect(astronaut())  # random weights: any number of boxes, but a well-formed answer
    assert len(found) <= detector.max_faces
    assert all(face.landmarks.shape == (4, 2) for face in found)


def _reference_state(path: Path) -> dict[str, torch.Tensor]:
    """The release's weights, unwrapped here by hand rather than by the code under test."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj = obj.get("params_ema", obj)
    return {k.removeprefix("module."): v for k, v in obj.items()}


def test_converted_tensors_equal_the_originals(releases, converted):
    for name, path in releases.items():
        original = _reference_state(path)
        written = load_file(output(converted, name))
        assert written.keys() == original.keys(), name
        for key, tensor in original.items():
            assert torch.equal(written[key], tensor), f"{name}: {key}"


def test_basicsr_names_round_trip_through_spandrel():
    """Our basicsr key names map back, through spandrel's own mapping, onto the very layers they came from."""
    import spandrel
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(7)
    basicsr = rrdbnet_state(4, TOY)
    torch.manual_seed(7)
    native = ESRGAN(in_nc=3, out_nc=3, num_filters=TOY.rrdb_feat, num_blocks=TOY.rrdb_blocks, scale=4)
    assert "conv_up2.weight" in basicsr and "body.0.rdb3.conv5.weight" in basicsr
    reloaded = spandrel.ModelLoader().load_from_state_dict(basicsr).model.state_dict()
    for key, tensor in native.state_dict().items():
        assert torch.equal(reloaded[key], tensor), key


def test_release_files_are_deterministic(tmp_path):
    first = build_release_files(tmp_path / "a", full=False, only=["RealESRGAN_x4plus"])
    second = build_release_files(tmp_path / "b", full=False, only=["RealESRGAN_x4plus"])
    a, b = _reference_state(first["RealESRGAN_x4plus"]), _reference_state(second["RealESRGAN_x4plus"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_prints_the_sha256_of_the_written_file(releases, tmp_path, capsys):
    out = tmp_path / "upscalers" / "RealESRGAN_x4plus.safetensors"
    assert main([str(releases["RealESRGAN_x4plus"]), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{out} architecture=ESRGAN purpose=SR scale=x4 ")
    assert line.rsplit("sha256=", 1)[1] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)

    assert main([str(releases["RealESRGAN_x2plus"]), str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["refused"] == []
    (entry,) = report["converted"]
    assert entry["output"] == str(tmp_path / "RealESRGAN_x2plus.safetensors")
    assert (entry["architecture"], entry["purpose"], entry["scale"]) == ("ESRGAN", "SR", 2)
    assert entry["sha256"] == hashlib.sha256(Path(entry["output"]).read_bytes()).hexdigest()


def test_directory_mode_converts_every_checkpoint(releases, tmp_path, capsys):
    source = tmp_path / "downloads"
    source.mkdir()
    # Every checkpoint suffix is picked up; other files are left alone.
    shutil.copy(releases["RealESRGAN_x4plus"], source / "a.pth")
    shutil.copy(releases["RealESRGAN_x2plus"], source / "b.ckpt")
    shutil.copy(releases["RealESRGAN_x4plus"], source / "c.pt")
    shutil.copy(releases["detection_mobilenet0.25_Final"], source / "d.bin")
    (source / "notes.txt").write_text("not a model")
    assert main([str(source), str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.safetensors", "b.safetensors", "c.safetensors", "d.safetensors"]
    assert len(capsys.readouterr().out.splitlines()) == 4

    # One refused file fails the run, but does not stop the others.
    torch.save({"epoch": 3}, source / "e.pth")
    shutil.rmtree(tmp_path / "out")
    assert main([str(source), str(tmp_path / "out")]) == 1
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 4


class TouchOnLoad:
    """A pickle payload: unpickled without restriction, it creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _payload(path: Path, canary: Path) -> Path:
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(4), "hook": TouchOnLoad(canary)}}, path)
    return path


def test_canary_pickle_is_refused_and_never_runs(tmp_path):
    # The payload is live: an unrestricted load of an identical file does create its canary.
    control = tmp_path / "control-canary"
    torch.load(_payload(tmp_path / "control.pth", control), weights_only=False)
    assert control.exists()

    canary = tmp_path / "canary"
    evil = _payload(tmp_path / "RealESRGAN_x4plus.pth", canary)
    out = tmp_path / "out.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "deployments.weights.convert", str(evil), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0
    assert "UNSAFE_WEIGHTS" in run.stderr and "restricted unpickler" in run.stderr
    assert not canary.exists()
    assert not out.exists()
    with pytest.raises(UnsafeWeights) as refused:
        read_checkpoint(evil)
    assert refused.value.field == "source"
    assert not canary.exists()


def test_non_tensor_pickles_are_refused(tmp_path):
    objects = tmp_path / "namespace.pth"
    torch.save(Namespace(lr=0.1), objects)  # harmless, but a class outside the restricted unpickler's list
    with pytest.raises(UnsafeWeights):
        read_checkpoint(objects)
    for name, obj in [("settings.pth", {"epoch": 3, "lr": [0.1], "name": "x"}), ("tensor.pth", torch.zeros(3))]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(ModelLoadError, match="no tensors|not a state dict"):
            convert_file(tmp_path / name, tmp_path / f"{name}.safetensors")
        assert not (tmp_path / f"{name}.safetensors").exists()
    for name, data in [("short.pth", b"hello"), ("noise.pth", bytes(range(256)) * 4)]:
        (tmp_path / name).write_bytes(data)  # not a checkpoint at all: a typed refusal, not a traceback
        with pytest.raises(ModelLoadError):
            read_checkpoint(tmp_path / name)


def test_unknown_state_dicts_need_allow_unknown(tmp_path, capsys):
    source = tmp_path / "mystery.pth"
    torch.save({"state_dict": {"encoder.weight": torch.randn(4, 4), "encoder.bias": torch.randn(4)}}, source)
    out = tmp_path / "mystery.safetensors"
    assert main([str(source), str(out)]) == 1
    assert not out.exists()
    assert main([str(source), str(out), "--allow-unknown"]) == 0
    assert "architecture=unknown" in capsys.readouterr().out
    assert set(load_file(out)) == {"encoder.weight", "encoder.bias"}


def test_unwrapping_prefers_ema_weights_and_strips_dataparallel():
    ema, raw = torch.ones(2), torch.zeros(2)
    checkpoint = {"iter": 100, "params": {"module.w": raw}, "params_ema": {"module.w": ema}}
    state = extract_state_dict(checkpoint, "ckpt.pth")
    assert list(state) == ["w"] and torch.equal(state["w"], ema)
    with pytest.raises(ModelLoadError, match="collide"):
        extract_state_dict({"w": raw, "module.w": ema}, "ckpt.pth")


def test_the_loader_still_refuses_the_original_pickles(releases):
    for path in releases.values():
        with pytest.raises(UnsafeWeights):
            loader.load_spandrel(str(path))


# The line-art, pose, soft-edge and M-LSD preprocessors' releases (lllyasviel/Annotators) a README command may
# convert, by module.
LINEART_RELEASES = {"sk_model.pth": "lineart_realistic", "sk_model2.pth": "lineart_coarse",
                    "netG.pth": "lineart_anime"}
# The pose modules' networks (openpose's body; openpose_hand's, _face's, _faceonly's and _full's hand and face too).
POSE_RELEASES = {"body_pose_model.pth": "body", "hand_pose_model.pth": "hand", "facenet.pth": "face"}
SOFTEDGE_RELEASES = {"ControlNetHED.pth": "hed", "table5_pidinet.pth": "pidinet"}  # the soft-edge networks
MLSD_RELEASE = "mlsd_large_512_fp32.pth"  # mlsd's


def readme_walkthrough() -> tuple[list[tuple[str, str]], list[str]]:
    """The conversion commands and the YAML blocks (the first: the ``args:`` of the upscalers and face models) of the
    README's "Serving real models" section."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Serving real models")[1]
    commands = re.findall(r"^python -m deployments\.weights\.convert (\S+) (\S+)$", section, re.MULTILINE)
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert commands and blocks, "the README lost its conversion walk-through"
    return commands, blocks


def test_readme_walkthrough_serves_the_converted_models(releases, tmp_path, monkeypatch):
    import yaml
    from PIL import Image

    from deployments.face_restorer import FaceEnhancer
    from deployments.factory import softedge as softedge_factory
    from deployments.factory.lineart import write_release
    from deployments.factory.mlsd import build_mlsd_pth
    from deployments.factory.pose import build_pose_pth
    from deployments.support import lineart, mlsd, pose, softedge
    from deployments.upscaler import ImageUpscaler
    from graphs.app import AppArgs

    downloads, model_dir = tmp_path / "Downloads", tmp_path / "models"
    downloads.mkdir()
    for name in ("RealESRGAN_x4plus", "RealESRGAN_x2plus", "codeformer", "detection_Resnet50_Final"):
        os.link(releases[name], downloads / releases[name].name)  # a hard link: no 400 MB copy
    monkeypatch.setenv("MODEL_DIR", str(model_dir))
    commands, blocks = readme_walkthrough()
    drawings = [source for source, _ in commands if Path(source).name in LINEART_RELEASES]
    poses = [source for source, _ in commands if Path(source).name in POSE_RELEASES]
    edges = [source for source, _ in commands if Path(source).name in SOFTEDGE_RELEASES]
    lines = [source for source, _ in commands if Path(source).name == MLSD_RELEASE]
    assert len(commands) - len(drawings) - len(poses) - len(edges) - len(lines) == 4
    for source in drawings:  # the line-art releases the README converts, as lllyasviel/Annotators ships them
        write_release(downloads / Path(source).name, LINEART_RELEASES[Path(source).name])
    for source in poses:  # the body, hand and face networks at their real sizes (209, 147, 154 MB)
        build_pose_pth(downloads, network=POSE_RELEASES[Path(source).name])
    for source in edges:  # HED and PiDiNet as released, at their real sizes
        softedge_factory.write_release(downloads / Path(source).name, SOFTEDGE_RELEASES[Path(source).name])
    if lines:  # M-LSD's network, at its real size too (6 MB)
        build_mlsd_pth(downloads)
    for source, target in commands:  # as the shell would expand them
        source = source.replace("~/Downloads", str(downloads))
        assert main([source, target.replace("$MODEL_DIR", str(model_dir))]) == 0

    args = AppArgs.model_validate({"base": {"model": {"source": "unused"}}, **yaml.safe_load(blocks[0])})
    upscaler = ImageUpscaler(args.upscaler)
    for name, scale in [("R-ESRGAN 4x+", 4), ("R-ESRGAN 2x+", 2)]:
        result = upscaler.upscale(Image.new("RGB", (32, 32), "gray"), name, scale=scale)
        assert (result.info["upscaler"], result.image.size, result.warnings) == (name, (32 * scale, 32 * scale), [])
    restorer = FaceEnhancer(args.face_restorer)
    assert restorer.name == "CodeFormer"
    assert isinstance(restorer.detector, faces.RetinaFaceDetector)
    for block in blocks[1:]:  # the base's preprocessors, where the README configures the converted networks
        base = yaml.safe_load(block).get("base", {})
        if "preprocessors" in base:
            sources = AppArgs.model_validate({"base": {"model": {"source": "unused"}, **base}}).base.preprocessors
            cpu = torch.device("cpu")
            loaded = {**lineart.load({m: s for m, s in sources.items() if m in lineart.MODEL_MODULES}, cpu),
                      **pose.load({m: s for m, s in sources.items() if m in pose.POSE_MODULES}, cpu),
                      **softedge.load({m: s for m, s in sources.items() if m in softedge.SOFTEDGE_MODULES}, cpu),
                      **mlsd.load({m: s for m, s in sources.items() if m in mlsd.MLSD_MODULES}, cpu)}
            assert set(loaded) == set(base["preprocessors"])


@pytest.mark.skipif(not os.environ.get("IMAGEGEN_FULLSIZE"), reason="full-size releases: set IMAGEGEN_FULLSIZE=1")
def test_full_size_releases_convert(tmp_path):
    files = build_release_files(tmp_path / "releases", full=True)
    for name, path in files.items():
        report = convert_file(path, tmp_path / "converted" / f"{path.stem}.safetensors")
        assert (report.architecture, report.purpose, report.scale) == EXPECTED[name]
