"""The GPU machine's kit (``make device-kit``): what it carries, and that what it leaves behind is never imported
until a feature the measurements do not use needs it."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import textwrap
from pathlib import Path

from tests import device_kit

ROOT = Path(__file__).resolve().parent.parent
# Import names of the packages the kit leaves out (device_kit.LEFT_OUT and what only they pull in).
LEFT_OUT_MODULES = ("boto3", "botocore", "c2pa", "cryptography", "imwatermark", "pywt", "mediapipe")


def test_the_kit_carries_the_serving_stack_at_the_versions_installed_here():
    wanted = device_kit.wanted()
    for name in ("ray", "diffusers", "pydantic", "pydantic-core", "fastapi", "starlette", "uvicorn", "spandrel",
                 "spandrel-extra-arches", "facexlib", "torchsde", "pydantic-settings", "torchao"):
        assert wanted[name] == md.version(name), name


def test_the_kit_leaves_the_image_and_the_lazy_features_behind():
    wanted = device_kit.wanted()
    assert not set(wanted) & device_kit.IMAGE  # torch, numpy, transformers... are the image's own
    for name in ("torch", "numpy", "transformers", "huggingface-hub", "boto3", "botocore", "s3transfer",
                 "c2pa-python", "cryptography", "mediapipe", "opencv-contrib-python", "invisible-watermark",
                 "pywavelets", "imagegen-serve"):
        assert name not in wanted, name


def test_the_left_out_packages_are_imported_only_by_the_features_that_use_them():
    """Every module of ``deployments`` and ``graphs`` imports with those packages unimportable (as on the GPU
    machine), so a new top-level ``import boto3`` fails here rather than in a lease."""
    script = textwrap.dedent(f"""
        import sys
        for name in {LEFT_OUT_MODULES!r}:
            sys.modules[name] = None  # import raises ImportError, as where the package is missing
        from tests import device_check
        print(device_check.check_imports())
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("libraries")


def test_the_device_check_of_attention_runs_here():
    """The lease's first call tries every attention preference on both head widths; on a CPU, too."""
    from tests import device_check

    assert device_check.check_attention().endswith("float32 on cpu")


def test_the_serve_phase_stops_at_once_where_the_fixtures_are_gone(tmp_path, caplog):
    """A machine given back between two calls keeps nothing: the Serve benchmark says so before it starts Ray,
    instead of spending the call waiting on replicas that cannot load."""
    from tests import bench_gpu_serve

    assert bench_gpu_serve.main(["--models", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 3
    assert "fixtures missing" in caplog.text and str(tmp_path / "sdxl-base") in caplog.text
    assert not (tmp_path / "out.json").exists()


def test_the_serve_phases_controlnet_is_opt_in_and_checked_before_it_starts(tmp_path, caplog):
    """``--controlnet`` (``CONTROLNET=1``) points the base's ControlNets at the full-size canny fixture and its
    request at the native API's unit; without the fixture the phase stops at once, naming it."""
    from graphs.api.generate import GenerateRequest
    from tests import bench_gpu_serve

    plain, _ = bench_gpu_serve.app_args(tmp_path, None)
    assert not plain["base"]["controlnets"]  # serve_config.yaml's, so the cold start loads no ControlNet
    args, _ = bench_gpu_serve.app_args(tmp_path, None, controlnet=True)
    assert args["base"]["controlnets"] == {"canny": str(tmp_path / "controlnet-canny-sdxl")}
    for path in bench_gpu_serve.fixtures(plain):  # every other fixture there
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
    request = GenerateRequest(**{**bench_gpu_serve.STANDARD, "controlnets": [bench_gpu_serve.canny_unit()]})
    assert [(u.model, u.preprocessor, u.control_mode) for u in request.controlnets] == [("canny", "canny", "balanced")]
    out = tmp_path / "out.json"
    assert bench_gpu_serve.main(["--models", str(tmp_path), "--out", str(out), "--controlnet"]) == 3
    assert "fixtures missing" in caplog.text and "controlnet-canny-sdxl" in caplog.text
    assert str(tmp_path / "sdxl-base") not in caplog.text.split("fixtures missing")[1]
