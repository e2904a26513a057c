"""``tests/device_run.sh check``: does this machine's Python run the service? Seconds, before a lease is spent.

Imports every module of ``deployments`` and ``graphs`` and the libraries they load lazily (a package the kit
lacks fails here, by name, not minutes into a benchmark), reports the versions that matter, compiles one small
function (Triton, where there is CUDA), and starts Ray with one Serve deployment answering over HTTP. Prints one
line per check; exits non-zero if any failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable

import deployments
import graphs


def modules() -> list[str]:
    names = []
    for package in (deployments, graphs):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    return sorted(names)


# What the serving path loads lazily (inside the functions that build pipelines, upscalers and restorers).
LIBRARIES = ("diffusers", "diffusers.pipelines.stable_diffusion_xl", "spandrel", "spandrel_extra_arches", "facexlib",
             "facexlib.detection.retinaface", "torchsde", "ray.serve", "fastapi", "pydantic_settings", "uvicorn",
             "torchao.quantization")


def check_imports() -> str:
    failed = []
    for name in modules() + list(LIBRARIES):
        try:
            importlib.import_module(name)
        except Exception as e:  # every missing package, not only the first
            failed.append(f"{name}: {type(e).__name__}: {e}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return f"{len(modules())} modules and {len(LIBRARIES)} libraries"


def check_versions() -> str:
    names = ("torch", "diffusers", "transformers", "huggingface-hub", "numpy", "ray", "pydantic", "spandrel",
             "torchao")
    return ", ".join(f"{n} {md.version(n)}" for n in names) + f", Python {sys.version.split()[0]}"


def check_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA: the benchmarks run their CPU mode"
    props = torch.cuda.get_device_properties(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        x @ x
    torch.cuda.synchronize()
    tflops = 10 * 2 * 4096**3 / (time.perf_counter() - started) / 1e12
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
            f"bf16 {torch.cuda.is_bf16_supported()}, flash SDPA {torch.backends.cuda.flash_sdp_enabled()}, "
            f"bf16 4096³ matmul {tflops:.0f} TFLOP/s (cold)")


def check_compile() -> str:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fn = torch.compile(lambda a: torch.nn.functional.gelu(a) * 2 + 1)
    a = torch.randn(1024, device=device)
    started = time.perf_counter()
    torch.testing.assert_close(fn(a), torch.nn.functional.gelu(a) * 2 + 1)
    return f"torch.compile on {device}: {time.perf_counter() - started:.1f}s"


def check_serve() -> str:
    import httpx
    import ray
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Echo:
        @api.get("/")
        def root(self) -> dict:
            return {"pid": os.getpid()}

    started = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8123})
        serve.run(Echo.bind(), name="check", route_prefix="/")
        answer = httpx.get("http://127.0.0.1:8123/", timeout=30).json()
        if answer.get("pid") == os.getpid():
            raise RuntimeError("the replica ran in this process")
        return f"Ray {ray.__version__} and Serve answered over HTTP in {time.perf_counter() - started:.1f}s"
    finally:
        serve.shutdown()
        ray.shutdown()


def check_attention() -> str:
    """Every ``fast.attention`` preference on the UNet's head width (64) and the VAE's (512, beyond the flash and
    cuDNN kernels): none may fail, since a request that fails at its decode has spent its steps."""
    import torch
    import torch.nn.functional as F

    from deployments.support import fastpath
    from deployments.support.config import FastPath

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for kernel in ("flash", "efficient", "cudnn", "math"):
        for heads, width in ((10, 64), (1, 512)):
            q = torch.randn(2, heads, 1024, width, device=device, dtype=dtype)
            with fastpath.attention(FastPath(attention=kernel)):
                F.scaled_dot_product_attention(q, q, q)
    return f"each kernel preferred, heads 64 and 512 wide, {str(dtype).removeprefix('torch.')} on {device}"


CHECKS: dict[str, Callable[[], str]] = {
    "versions": check_versions,
    "imports": check_imports,
    "cuda": check_cuda,
    "compile": check_compile,
    "attention": check_attention,
    "serve": check_serve,
}


def main() -> int:
    failures = 0
    for name, check in CHECKS.items():
        try:
            sys.stdout.write(f"ok    {name}: {check()}\n")
        except Exception as e:
            failures += 1
            sys.stdout.write(f"FAIL  {name}: {type(e).__name__}: {e}\n")
            traceback.print_exc()
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
