"""Several base checkpoints on the tiny models, without Ray: the catalogue (config, folder, aliases, titles), a
replica's least-recently-used set with the evicted memory freed, distinct images per checkpoint, LoRAs and
IP-Adapter on either, and A1111's latent hires fix."""

from __future__ import annotations

import gc
import json
import shutil
import time
import weakref

import numpy as np
import pytest
from PIL import Image

from deployments.support.checkpoints import Catalog
from deployments.support.config import SDXLBaseConfig
from deployments.support.errors import InvalidInput, UnknownModel
from deployments.support.generation import GenerationRequest, LatentHires, LoraRef
from deployments.support.settings import Settings
from tests.helpers import pixels

SMALL = dict(prompt="a lighthouse", width=128, height=128, steps=4, guidance_scale=5.0, seed=7)


def config(tiny, **extra) -> SDXLBaseConfig:
    return SDXLBaseConfig.model_validate({
        "checkpoints": [{"name": "tiny-a", "source": str(tiny / "sdxl-base")},
                        {"name": "tiny-b", "source": str(tiny / "sdxl-base-b")}],
        "checkpoint_dir": str(tiny / "checkpoints"), "checkpoint_config": str(tiny / "sdxl-base"),
        "checkpoint_aliases": {"photorealistic": "tiny-a", "anime": "tiny-b"},
        "lora_dir": str(tiny / "loras"), "ip_adapter": str(tiny / "ip-adapter"), **extra})


@pytest.fixture(scope="module")
def two(tiny):
    """A replica's model holding at most two checkpoints."""
    from deployments.sdxl_base import BaseGenerator

    return BaseGenerator(config(tiny, max_loaded_checkpoints=2))


def run(generator, checkpoint: str | None = None, **kw):
    return generator.generate(GenerationRequest(**{**SMALL, **kw}, checkpoint=checkpoint))


# --- configuration and the catalogue ------------------------------------------------------------------------------

@pytest.fixture
def settings(tmp_path) -> Settings:
    """Checkpoint hashes go to this test's cache, never the user's."""
    return Settings(MODEL_CACHE_DIR=tmp_path / "cache")


def test_a_single_model_config_stays_valid_as_a_one_entry_list(tiny):
    one = SDXLBaseConfig.model_validate({"model": {"source": str(tiny / "sdxl-base")}, "name": "solo"})
    assert [(c.name, c.source) for c in one.configured] == [("solo", str(tiny / "sdxl-base"))]
    assert Catalog(one).default == "solo"


@pytest.mark.parametrize("bad, words", [
    ({"checkpoints": [{"name": "x", "source": "a"}, {"name": "x", "source": "b"}]}, "unique"),
    ({"checkpoints": [{"name": "x", "source": "a"}], "checkpoint_aliases": {"anime": "y"}}, "not a checkpoint"),
    ({"checkpoints": [{"name": "../x", "source": "a"}]}, "name"),
    ({}, "give `model`"),
])
def test_bad_checkpoint_configs_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        SDXLBaseConfig.model_validate(bad)


def test_catalogue_resolves_names_aliases_and_titles(tiny, settings):
    catalog = Catalog(config(tiny), settings)
    assert list(catalog.entries()) == ["tiny-a", "tiny-b", "sdxl-base-b"]  # configured first, then the folder
    assert catalog.default == "tiny-a"
    assert catalog.resolve("anime", "model") == "tiny-b"
    assert catalog.resolve(catalog.title("sdxl-base-b"), "model") == "sdxl-base-b"  # A1111 sends titles back
    assert catalog.entries()["sdxl-base-b"].origin == "folder"
    with pytest.raises(UnknownModel) as e:
        catalog.resolve("../../etc/passwd", "override_settings.sd_model_checkpoint")
    assert e.value.field == "override_settings.sd_model_checkpoint"
    assert e.value.details["choices"] == ["tiny-a", "tiny-b", "sdxl-base-b", "photorealistic", "anime"]


def test_catalogue_resolves_what_a1111_clients_send(tiny, settings):
    """A1111 titles and saved settings name a checkpoint by file name (with its extension), ``file [hash]``, the
    short hash or the full SHA-256; all resolve, and an unknown one is still the structured error."""
    import hashlib

    catalog = Catalog(config(tiny), settings)
    sha = hashlib.sha256((tiny / "checkpoints" / "sdxl-base-b.safetensors").read_bytes()).hexdigest()
    for sent in ("sdxl-base-b.safetensors", f"sdxl-base-b.safetensors [{sha[:10]}]", "sdxl-base-b.ckpt",
                 f"sdxl-base-b [{sha[:10]}]", sha[:10], sha, f"renamed.safetensors [{sha[:10]}]"):
        assert catalog.resolve(sent, "model") == "sdxl-base-b", sent
    assert catalog.resolve("sdxl-base", "model") == "tiny-a"  # a configured checkpoint's own file (folder) name
    folder_sha = catalog.sha256(str(tiny / "sdxl-base-b"))
    assert folder_sha is not None and catalog.resolve(folder_sha[:10], "model") == "tiny-b"  # a folder's hash
    for unknown in ("nope.safetensors", "0123456789", "nope [0123456789]"):
        with pytest.raises(UnknownModel) as e:
            catalog.resolve(unknown, "override_settings.sd_model_checkpoint")
        assert e.value.field == "override_settings.sd_model_checkpoint"


def test_titles_carry_a1111_hashes(tiny, settings):
    import hashlib

    catalog = Catalog(config(tiny), settings)
    sha = hashlib.sha256((tiny / "checkpoints" / "sdxl-base-b.safetensors").read_bytes()).hexdigest()
    assert catalog.title("sdxl-base-b") == f"sdxl-base-b [{sha[:10]}]"
    assert catalog.sha256(str(tiny / "sdxl-base")) != catalog.sha256(str(tiny / "sdxl-base-b"))  # folders too
    assert sha in json.loads((settings.model_cache_dir / "checkpoint-hashes.json").read_text()).values()  # kept


def test_a_file_dropped_in_the_folder_is_selectable_and_a_removed_one_is_gone(tiny, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    catalog = Catalog(config(tiny, checkpoint_dir=str(folder)), Settings(MODEL_CACHE_DIR=tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # nothing hashed yet: listing names needs no hash
    assert list(catalog.entries()) == ["tiny-a", "tiny-b"]
    with pytest.raises(UnknownModel):
        catalog.resolve("dropped", "model")
    shutil.copy(tiny / "checkpoints" / "sdxl-base-b.safetensors", folder / "dropped.safetensors")
    (folder / "pickled.ckpt").write_bytes(b"not a checkpoint")  # only safetensors are checkpoints
    assert catalog.resolve("dropped", "model") == "dropped"
    assert list(catalog.entries()) == ["tiny-a", "tiny-b", "dropped"]
    (folder / "dropped.safetensors").unlink()
    assert list(catalog.entries(rescan=True)) == ["tiny-a", "tiny-b"]


# --- one replica's checkpoints -------------------------------------------------------------------------------------

def test_two_checkpoints_give_different_images_for_the_same_seed_and_settings(two):
    a, b, a_again = run(two, "tiny-a"), run(two, "tiny-b"), run(two, "tiny-a")
    assert a.info["model"] == "tiny-a" and b.info["model"] == "tiny-b"
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).mean() > 5.0
    assert np.array_equal(pixels(a.images[0]), pixels(a_again.images[0]))
    assert two.resident.describe()["loads"] == {"tiny-a": 1, "tiny-b": 1}  # two held: nothing reloaded


def test_the_single_file_and_the_folder_of_one_checkpoint_agree(two):
    folder, single = run(two, "tiny-b"), run(two, "sdxl-base-b")
    assert np.abs(pixels(folder.images[0]) - pixels(single.images[0])).max() <= 1


def test_loras_samplers_and_ip_adapter_work_on_either_checkpoint(two, astronaut):
    for name in ("tiny-a", "tiny-b"):
        plain = pixels(run(two, name).images[0])
        styled = pixels(run(two, name, loras=[LoraRef(name="tiny-style")]).images[0])
        ddim = pixels(run(two, name, sampler="DDIM").images[0])
        adapted = pixels(run(two, name, ip_adapter_image=astronaut.resize((64, 64)), ip_adapter_scale=1.0).images[0])
        assert min(np.abs(plain - other).mean() for other in (styled, ddim, adapted)) > 1.0, name
        assert np.array_equal(plain, pixels(run(two, name).images[0]))  # and none of them leaks


def test_least_recently_used_is_evicted_and_its_memory_freed(tiny):
    from deployments.sdxl_base import BaseGenerator

    generator = BaseGenerator(config(tiny, max_loaded_checkpoints=2))
    run(generator, "tiny-a")
    run(generator, "tiny-b")
    run(generator, "tiny-a")  # now tiny-b is the least recently used
    held = generator.resident.held("tiny-b")
    evicted, unet = weakref.ref(held), weakref.ref(held.txt2img.unet)
    per_checkpoint = held.parameters
    del held
    run(generator, "sdxl-base-b")
    state = generator.resident.describe()
    assert state["held"] == ["tiny-a", "sdxl-base-b"] and state["evictions"] == 1
    assert evicted() is None and unet() is None and state["evicted_alive"] == 0  # gone, not just unlisted
    assert state["parameters"] == 2 * per_checkpoint  # two held, as configured


def test_a_request_on_a_checkpoint_evicted_meanwhile_finishes_then_frees_it(tiny):
    from deployments.sdxl_base import BaseGenerator

    generator = BaseGenerator(config(tiny, max_loaded_checkpoints=1))
    pipes = generator.checkpoint("tiny-a")  # what Serve hands a request before it reaches the inference thread
    alone = run(generator, "tiny-a")
    run(generator, "tiny-b")  # evicts tiny-a while that request still holds it
    late = generator.generate(GenerationRequest(**SMALL, checkpoint="tiny-a"), pipes=pipes)
    assert np.array_equal(pixels(late.images[0]), pixels(alone.images[0]))
    assert generator.resident.describe()["evicted_alive"] == 1
    evicted = weakref.ref(pipes)
    del pipes
    generator.resident.sweep()
    assert evicted() is None and generator.resident.describe()["evicted_alive"] == 0


def test_switch_time_against_a_held_checkpoint(tiny):
    """Reported figures (read with -s): loading a tiny checkpoint, and a request on a held one or on one that
    must be loaded first (the switch)."""
    from deployments.sdxl_base import BaseGenerator

    generator = BaseGenerator(config(tiny, max_loaded_checkpoints=1))
    run(generator, "tiny-a")

    def timed(name: str) -> float:
        started = time.perf_counter()
        run(generator, name)
        return time.perf_counter() - started

    held = min(timed("tiny-a") for _ in range(3))
    switches = [timed(name) for name in ("tiny-b", "tiny-a", "tiny-b")]
    loads = generator.resident.describe()["load_seconds"]
    print(f"tiny checkpoint load: {loads}; request on a held checkpoint {held:.2f}s, "  # noqa: T201
          f"on a checkpoint to load (switch) {min(switches):.2f}s")
    assert min(switches) > held and generator.resident.describe()["loads"] == {"tiny-a": 2, "tiny-b": 2}


def test_batch_key_never_mixes_checkpoints():
    from deployments.sdxl_base import batch_key

    a = GenerationRequest(**SMALL, checkpoint="tiny-a")
    assert batch_key(a) != batch_key(a.model_copy(update={"checkpoint": "tiny-b"}))
    assert batch_key(a) == batch_key(a.model_copy(update={"seed": 8, "prompt": "another"}))


def test_unknown_checkpoint_in_a_request_lists_the_choices(two):
    with pytest.raises(UnknownModel) as e:
        run(two, "sd_xl_turbo")
    assert "tiny-b" in e.value.details["choices"]


# --- A1111's latent hires fix ----------------------------------------------------------------------------------------

def hires(mode: str, width: int = 256, height: int = 192) -> LatentHires:
    return LatentHires(width=width, height=height, mode=mode, strength=0.6, steps=4)


def twice(generator, mode: str, scale: float = 2.0, on_progress=None):
    """128x96, then the latent hires fix to ``scale`` times that."""
    request = GenerationRequest(**{**SMALL, "width": 128, "height": 96}, checkpoint="tiny-a",
                                hires=hires(mode, int(128 * scale), int(96 * scale)))
    return generator.generate(request, on_progress=on_progress)


def test_latent_hires_fix_gives_the_hires_size_and_counts_both_passes(two):
    seen = []
    result = twice(two, "Latent", on_progress=lambda s, t: seen.append((s, t)))
    assert result.images[0].size == (256, 192) and result.info["hires_upscaler"] == "Latent"
    assert seen[-1] == (8, 8) and seen[3] == (4, 8)  # 4 first-pass steps, then A1111's 4 at the hires size


def test_each_latent_mode_resizes_the_latents_its_own_way(two):
    # x1.5, where nearest and nearest-exact pick different latent pixels (at x2 they coincide)
    modes = {mode: pixels(twice(two, mode, 1.5).images[0]) for mode in
             ("Latent", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
              "Latent (nearest-exact)")}
    for mode, image in modes.items():
        assert image.shape == (144, 192, 3)
        others = [np.abs(image - other).mean() for name, other in modes.items() if name != mode]
        assert min(others) > 0.5, mode
    assert twice(two, "Latent (antialiased)", 1.5).images[0].size == (192, 144)


def test_latent_hires_fix_differs_from_the_lanczos_pixel_path(two):
    """The pixel path A1111 takes for a named upscaler: decode, resize with Lanczos, img2img at the hires size."""
    first = run(two, "tiny-a", width=128, height=96)
    upscaled = first.images[0].resize((256, 192), Image.Resampling.LANCZOS)
    lanczos = run(two, "tiny-a", init_image=upscaled, width=256, height=192, strength=0.6)
    latent = twice(two, "Latent")
    assert latent.images[0].size == lanczos.images[0].size == (256, 192)
    assert np.abs(pixels(latent.images[0]) - pixels(lanczos.images[0])).mean() > 2.0


def test_latent_hires_fix_keeps_the_centre_of_the_resized_latents_when_cropped(two):
    """A1111's hr_resize_x and hr_resize_y both set: the latents resized to cover them, then truncated to them
    around their centre before the second pass."""
    cropped = LatentHires(width=256, height=192, crop_width=128, crop_height=192, strength=0.6, steps=4)
    request = GenerationRequest(**{**SMALL, "width": 128, "height": 96}, checkpoint="tiny-a", hires=cropped)
    assert two.generate(request).images[0].size == (128, 192)
    with pytest.raises(ValueError, match="exceeds"):
        LatentHires(width=128, height=128, crop_width=256, crop_height=64)


def test_latent_hires_fix_is_refused_outside_text_to_image(two, astronaut):
    with pytest.raises(InvalidInput) as e:
        run(two, "tiny-a", init_image=astronaut.resize((128, 128)), hires=hires("Latent"))
    assert e.value.field == "hires"


def teardown_module() -> None:
    gc.collect()


def test_a_file_version_is_hashed_once_on_a_host_however_many_processes_and_threads_ask(tmp_path, monkeypatch):
    """A base replica hashes a checkpoint as it loads it; an ingress that started before reads that hash from the
    shared file instead of hashing gigabytes again on its first A1111 request, and concurrent first askers wait for
    one hash."""
    import concurrent.futures
    import hashlib
    import threading

    from deployments.support import checkpoints

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    shared = tmp_path / "cache" / "hashes.json"
    ingress, base = checkpoints.HashCache(shared), checkpoints.HashCache(shared)  # two processes' caches
    calls, lock, sha256 = [], threading.Lock(), hashlib.sha256

    def counted(*args):
        with lock:
            calls.append(1)
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        return sha256(*args)

    monkeypatch.setattr(checkpoints.hashlib, "sha256", counted)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = set(pool.map(lambda _: base.file(weights), range(4)))
    assert len(answers) == 1 and len(calls) == 1
    assert ingress.file(weights) == answers.pop() and len(calls) == 1  # read from the shared file, not hashed
    weights.write_bytes(b"other weights")  # a new version is hashed anew
    assert ingress.file(weights) == sha256(b"other weights").hexdigest() and len(calls) == 2
    assert set(json.loads(shared.read_text()).values()) >= {ingress.file(weights)}
