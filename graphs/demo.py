"""`make demo`: a local Ray head (with dashboard) serving configs/cpu.yaml on 127.0.0.1:8000 until Ctrl-C."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = Path(os.environ.get("SERVE_CONFIG", ROOT / "configs" / "cpu.yaml"))
    if "TINY_MODELS" not in os.environ:
        logger.error("TINY_MODELS is not set: run `make demo`, which builds the tiny models first")
        return 2
    logger.warning(
        "DEMO WEIGHTS: the models under %s are tiny RANDOM-weight networks of the real SDXL, Real-ESRGAN, "
        "RestoreFormer and BLIP architectures; images will look like noise and captions like random words. To "
        "serve real SDXL, edit the sources in serve_config.yaml (a local diffusers folder, a single .safetensors "
        "checkpoint, a Hugging Face id in the local cache, or an s3:// URI) and run `serve deploy "
        "serve_config.yaml` on a GPU cluster.",
        os.environ["TINY_MODELS"],
    )
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "ray", "start", "--head", "--num-gpus=1", "--num-cpus=4", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", "--disable-usage-stats"], check=True)
    logger.info("Ray dashboard: http://127.0.0.1:8265  API: http://127.0.0.1:8000/docs  "
                "page: http://127.0.0.1:8000/ui")
    try:
        return subprocess.run([bin_dir / "serve", "run", "--address", "auto", str(config)], cwd=ROOT).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        subprocess.run([bin_dir / "ray", "stop"], check=False)


if __name__ == "__main__":
    sys.exit(main())
