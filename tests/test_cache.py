"""The result cache without Ray: entries whole or absent, the age and size bounds (least recently used evicted
first, the store listed only when needed), local files and a real S3 server, keys that change with every field that
changes the image, with the marks the files carry and with every weight file (a replaced LoRA or checkpoint misses),
the base's part being the named checkpoint's, whichever replica answers; no key for a random seed."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from deployments.support.settings import Settings
from graphs.jobs.cache import LOW_WATER, LocalEntries, ResultCache, S3Entries, open_cache, pack, request_key, unpack
from tests.helpers import s3_client

KEY = "a" * 64


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def age(entries: LocalEntries, key: str, seconds: float) -> None:
    """Make an entry look ``seconds`` older on disk (eviction orders by the listing's times)."""
    path = entries.root / f"{key}.entry"
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_an_entry_round_trips_and_a_damaged_one_is_a_miss(tmp_path):
    facts, files = {"seed": 3, "warnings": ["w"], "size": [64, 64]}, [b"\x89PNG one", b"", b"three"]
    assert unpack(pack(facts, files, 12.5)).__dict__ == {"facts": facts, "files": files, "created": 12.5}
    entries = LocalEntries(tmp_path)
    cache = ResultCache(entries, max_bytes=10_000, max_age_s=60)
    cache.put(KEY, facts, files)
    assert cache.get(KEY).files == files and cache.get("b" * 64) is None
    (tmp_path / f"{KEY}.entry").write_bytes(pack(facts, files, 1.0)[:-2])  # cut short
    assert cache.get(KEY) is None and not (tmp_path / f"{KEY}.entry").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary files left behind


def test_entries_older_than_the_age_bound_miss_and_are_evicted(tmp_path):
    clock = Clock()
    entries = LocalEntries(tmp_path)
    cache = ResultCache(entries, max_bytes=10_000, max_age_s=30, clock=clock)
    cache.put(KEY, {"n": 1}, [b"x" * 10])
    clock.now += 29
    assert cache.get(KEY) is not None
    clock.now += 2
    assert cache.get(KEY) is None and entries.listing() == []
    clock.now = time.time()  # eviction reads the store's own times
    cache.put("b" * 64, {}, [b"y"])
    age(entries, "b" * 64, 100)
    assert cache.evict() == ["b" * 64 + ".entry"]


def test_the_size_bound_evicts_the_oldest_first(tmp_path):
    entries = LocalEntries(tmp_path)
    one = len(pack({"n": 0}, [b"x" * 1000], time.time()))
    cache = ResultCache(entries, max_bytes=3 * one + 100, max_age_s=3600)
    keys = [c * 64 for c in "abcd"]
    for i, key in enumerate(keys):
        cache.put(key, {"n": i}, [b"x" * 1000])
        age(entries, key, 10 * (4 - i))  # a the oldest, d the newest
    # Past the bound, down to the low-water mark (2.7 entries' worth): the two oldest go.
    assert cache.get(keys[0]) is None and cache.get(keys[1]) is None
    assert cache.get(keys[2]).facts == {"n": 2} and cache.get(keys[3]) is not None
    assert sum(size for _, size, _ in entries.listing()) <= cache.max_bytes * LOW_WATER
    cache.put("e" * 64, {}, [b"x" * (4 * one)])  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("e" * 64) is None and cache.get(keys[3]) is not None


def test_a_hit_renews_an_entry_so_the_least_recently_used_goes_first(tmp_path):
    entries = LocalEntries(tmp_path)
    one = len(pack({"n": 0}, [b"x" * 1000], time.time()))
    cache = ResultCache(entries, max_bytes=3 * one + 100, max_age_s=3600)
    for i, name in enumerate("abc"):
        cache.put(name * 64, {"n": i}, [b"x" * 1000])
        age(entries, name * 64, 300 - 100 * i)  # made in the order a, b, c
    assert cache.get("a" * 64).facts == {"n": 0}  # a hit on a renews it: b, then c, are the least recently used
    cache.put("d" * 64, {"n": 3}, [b"x" * 1000])
    assert cache.get("b" * 64) is None and cache.get("c" * 64) is None
    assert cache.get("a" * 64) is not None and cache.get("d" * 64) is not None


def test_a_hit_renews_at_most_once_a_minute(tmp_path):
    entries = LocalEntries(tmp_path)
    cache = ResultCache(entries, max_bytes=10_000, max_age_s=3600)
    cache.put(KEY, {}, [b"x"])
    age(entries, KEY, 30)
    stamp = entries.read(f"{KEY}.entry")[1]
    assert cache.get(KEY) is not None and entries.read(f"{KEY}.entry")[1] == stamp
    age(entries, KEY, 60)
    assert cache.get(KEY) is not None and abs(entries.read(f"{KEY}.entry")[1] - time.time()) < 5


def test_stores_list_the_store_only_past_the_bound_or_a_minute_on(tmp_path):
    class Counted(LocalEntries):
        listings = 0

        def listing(self):
            Counted.listings += 1
            return super().listing()

    clock = Clock()
    entries = Counted(tmp_path)
    one = len(pack({}, [b"x" * 1000], time.time()))  # give or take a digit of the time's
    cache = ResultCache(entries, max_bytes=20 * one + one // 2, max_age_s=3600, clock=clock)
    for i in range(10):
        cache.put(f"{i:064x}", {}, [b"x" * 1000])
    assert Counted.listings == 1  # the first store lists; nine more fit in what it counted
    clock.now += ResultCache.SWEEP_S
    cache.put(f"{10:064x}", {}, [b"x" * 1000])  # within the bound as counted, but a minute on: listed
    assert Counted.listings == 2
    for i in range(11, 21):
        cache.put(f"{i:064x}", {}, [b"x" * 1000])
    assert Counted.listings == 3  # the 21st passed the bound: listed, the least recently used dropped
    assert len(os.listdir(tmp_path)) == 18 and not (tmp_path / f"{0:064x}.entry").exists()  # to the low water
    for i in range(21, 23):
        cache.put(f"{i:064x}", {}, [b"x" * 1000])
    assert Counted.listings == 3  # room below the bound again: no listing


def test_a_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    entries = LocalEntries(tmp_path)
    cache = ResultCache(entries, max_bytes=10_000, max_age_s=3600)
    cache.put("b" * 64, {}, [b"kept"])

    def full_disk(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError):
        cache.put(KEY, {}, [b"x" * 1000])
    assert sorted(os.listdir(tmp_path)) == ["b" * 64 + ".entry"]


def test_entries_on_s3(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = s3_client(s3_server)
    client.create_bucket(Bucket="cache-test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("JOB_RESULTS_URL", "s3://cache-test/results")
    from deployments.support.settings import current

    cache = open_cache(current(), enabled=True)
    assert isinstance(cache.entries, S3Entries) and cache.entries.prefix == "results/cache/"
    cache.max_bytes = 3 * len(pack({}, [b"z" * 500], time.time())) + 100
    for key in ("a" * 64, "b" * 64, "c" * 64, "d" * 64):
        cache.put(key, {}, [b"z" * 500])
        time.sleep(1.1)  # S3 times have whole seconds
    assert cache.get("a" * 64) is None and cache.get("d" * 64).files == [b"z" * 500]
    listed = client.list_objects_v2(Bucket="cache-test", Prefix="results/cache/")["Contents"]
    assert sorted(o["Key"] for o in listed) == ["results/cache/" + "c" * 64 + ".entry",
                                                "results/cache/" + "d" * 64 + ".entry"]
    made = cache.entries.read("c" * 64 + ".entry")[1]
    cache.entries.touch("c" * 64 + ".entry")  # a hit's renewal: a copy onto itself
    data, used = cache.entries.read("c" * 64 + ".entry")
    assert used > made and unpack(data).files == [b"z" * 500]


def test_the_cache_is_opt_in(monkeypatch, tmp_path):
    monkeypatch.setenv("JOBS_DATA_DIR", str(tmp_path))
    assert open_cache(Settings()) is None and open_cache(Settings(), enabled=False) is None
    monkeypatch.setenv("RESULT_CACHE", "true")
    monkeypatch.setenv("RESULT_CACHE_MAX_BYTES", "12345")
    cache = open_cache(Settings())
    assert cache.max_bytes == 12345 and cache.entries.root == tmp_path / "cache"
    assert open_cache(Settings(), enabled=False) is None  # the app's argument wins
    monkeypatch.setenv("RESULT_CACHE_MAX_AGE_S", "0")
    with pytest.raises(ValueError):
        Settings()


def test_keys_follow_the_request_and_the_models():
    models = {"base": {"checkpoint": "1"}, "safety": None}
    key = request_key("generate", {"prompt": "x", "seed": 1}, models)
    assert key == request_key("generate", {"seed": 1, "prompt": "x"}, dict(reversed(models.items())))
    assert key != request_key("a1111-txt2img", {"prompt": "x", "seed": 1}, models)
    assert key != request_key("generate", {"prompt": "x", "seed": 2}, models)
    assert key != request_key("generate", {"prompt": "x", "seed": 1}, {**models, "safety": {"safety_checker": "2"}})


# The fields of the /generate body that change no pixel of the answer, so the key leaves them out; each says why.
NOT_IN_THE_IMAGE = {"preset": "it fills in the other fields before the key is taken: their values are keyed"}
# Every other field of the body, with a value other than the one in GENERATE.
ALTERNATIVES = {"prompt": "a pear", "negative_prompt": "blurry", "seed": 2, "width": 512, "height": 768,
                "num_inference_steps": 12, "guidance_scale": 3.5, "use_refiner": False, "hires_fix": True,
                "use_realesrgan": False, "use_face_restoration": True, "face_restoration_weight": 0.9,
                "overlay": {"text": "a caption"}, "model": "anime",
                "controlnets": [{"model": "tiny-canny", "image": "aW1hZ2U=", "preprocessor": "canny"}]}
GENERATE = {"prompt": "an apple", "seed": 1, "model": "tiny-sdxl-base"}


def test_every_field_of_the_generate_body_that_changes_the_image_changes_its_key():
    """A field the key left out would answer a request from the cache with another request's image (the face
    restoration asked for, never run). The table follows the request model, so a new field must be placed."""
    from graphs import plans
    from graphs.api.generate import GenerateRequest

    assert set(ALTERNATIVES) == set(GenerateRequest.model_fields) - set(NOT_IN_THE_IMAGE)
    models = {"base": {"checkpoint": "1"}}

    def key(**fields) -> str:
        body = GenerateRequest(**{**GENERATE, **fields}).model_dump()
        return request_key("generate", plans.seed000_fields(body, "R-ESRGAN 2x+"), models)

    assert [name for name, value in ALTERNATIVES.items() if key(**{name: value}) == key()] == []


@pytest.mark.parametrize(("name", "value"), [
    ("watermark_enabled", False), ("watermark_bits", "10101010"), ("watermark_luma_scale", 12.0),
    ("watermark_chroma_scale", 36.0), ("c2pa_algorithm", "ps256"), ("c2pa_tsa_url", "http://tsa.test/"),
    ("c2pa_cert_file", Path("signer.pem")),
])
def test_every_marking_setting_is_part_of_the_key(name, value):
    """A cached file keeps the watermark and credentials it was made with: once the marks change (the watermark
    turned off, another signer), the old files must miss."""
    from graphs.jobs.cache import marks

    other = Settings(**{name: value, **({"c2pa_key_file": Path("signer.key")} if name == "c2pa_cert_file" else {})})
    assert marks(other) != marks(Settings())


def test_a_random_seed_gets_no_key(tmp_path):
    """Seed -1 draws a new seed each time: an answer kept for it would be served to the next random request."""
    import asyncio
    from types import SimpleNamespace

    from graphs.jobs.cache import RequestCache

    async def fingerprint(*_args) -> dict:
        return {"weights": "1"}

    stage = SimpleNamespace(fingerprint=SimpleNamespace(remote=fingerprint))
    handles = SimpleNamespace(base=stage, refiner=None, upscaler=stage, faces=stage, safety=None)
    cache = RequestCache(ResultCache(LocalEntries(tmp_path), 10_000, 60), handles, Settings())
    assert asyncio.run(cache.key("generate", {"prompt": "x", "seed": 1}, None)) is not None  # the cache is on
    assert asyncio.run(cache.key("generate", {"prompt": "x", "seed": -1}, None)) is None
    assert asyncio.run(cache.key("a1111-txt2img", {"prompt": "x"}, None)) is None  # no seed given: a random one


def test_a_replaced_lora_or_checkpoint_changes_the_key(tiny, tmp_path):
    """A LoRA file swapped under the same name, or the UNet weights replaced, give another key."""
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    shutil.copytree(tiny / "sdxl-base", tmp_path / "sdxl-base")
    shutil.copytree(tiny / "loras", tmp_path / "loras")
    config = SDXLBaseConfig(model={"source": str(tmp_path / "sdxl-base")}, lora_dir=str(tmp_path / "loras"))
    settings = Settings(MODEL_CACHE_DIR=tmp_path / "cache")  # checkpoint hashes: never the user's cache

    def key() -> tuple[str, dict]:
        models = {"base": BaseGenerator(config, settings, preload=False).fingerprint()}
        return request_key("generate", {"prompt": "x", "seed": 1}, models), models["base"]

    first, hashes = key()
    assert key()[0] == first  # reloading the same files: the same key
    shutil.copy(tiny / "loras" / "tiny-detail.safetensors", tmp_path / "loras" / "tiny-style.safetensors")
    second, changed = key()
    assert second != first and [r for r in hashes if hashes[r] != changed[r]] == ["lora:tiny-style"]
    unet = tmp_path / "sdxl-base" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-4:] = bytes(4)  # the last weight's bytes: still a loadable file
    unet.write_bytes(bytes(data))
    third, changed = key()
    assert third not in (first, second) and changed["checkpoint"] != hashes["checkpoint"]


def test_the_base_key_is_the_checkpoint_named_whichever_replica_answers(tiny, tmp_path):
    """Multiplexing may route a request to any base replica: the base's part of the key is the named checkpoint's
    catalogue hash (the one A1111's listings show), the same from a replica holding it or holding another."""
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    config = SDXLBaseConfig(checkpoints=[{"name": "a", "source": str(tiny / "sdxl-base")},
                                         {"name": "b", "source": str(tiny / "sdxl-base-b")}],
                            lora_dir=str(tiny / "loras"))
    settings = Settings(MODEL_CACHE_DIR=tmp_path / "cache")
    holding_a = BaseGenerator(config, settings)  # loads the default, a
    holding_none = BaseGenerator(config, settings, preload=False)
    assert holding_a.resident.names == ["a"] and holding_none.resident.names == []
    for name in ("a", "b"):
        assert holding_a.fingerprint(name) == holding_none.fingerprint(name)
    one, other = holding_none.fingerprint("a"), holding_none.fingerprint("b")
    assert holding_none.fingerprint() == one  # no name: the default
    assert one["checkpoint"] != other["checkpoint"] and {k for k in one if one[k] != other[k]} == {"checkpoint"}
    sha = holding_none.catalog.sha256(str(tiny / "sdxl-base-b"))
    assert other["checkpoint"] == f"b:{sha}" and holding_none.catalog.title("b") == f"b [{sha[:10]}]"
    assert set(other) >= {"base_runtime", "base_defaults", "lora:tiny-style", "lora:tiny-detail"}


def test_an_s3_checkpoint_is_keyed_on_its_listing_without_a_download(tiny, tmp_path, s3_server):
    """A base replica asked for the key of an S3 checkpoint it does not hold reads one listing, downloads nothing,
    and answers as a replica that loaded it does; replacing any object of the folder changes the key once the
    identity is read again (a minute on)."""
    from deployments.sdxl_base import BaseGenerator
    from deployments.support.config import SDXLBaseConfig

    client = s3_client(s3_server)
    client.create_bucket(Bucket="ckpt")
    for path in (tiny / "sdxl-base").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "ckpt", f"base/{path.relative_to(tiny / 'sdxl-base')}")
    config = SDXLBaseConfig(checkpoints=[{"name": "local", "source": str(tiny / "sdxl-base")},
                                         {"name": "remote", "source": "s3://ckpt/base"}])
    holding_none = BaseGenerator(config, Settings(AWS_ENDPOINT_URL=s3_server, MODEL_CACHE_DIR=tmp_path / "none"),
                                 preload=False)
    before = holding_none.fingerprint("remote")["checkpoint"]
    assert before.startswith("remote:s3:") and not (tmp_path / "none" / "s3").exists()
    holding_it = BaseGenerator(config, Settings(AWS_ENDPOINT_URL=s3_server, MODEL_CACHE_DIR=tmp_path / "held"),
                               preload=False)
    holding_it.checkpoint("remote")  # downloads and loads it
    assert (tmp_path / "held" / "s3" / "ckpt" / "base" / "model_index.json").is_file()
    assert holding_it.fingerprint("remote")["checkpoint"] == before
    client.put_object(Bucket="ckpt", Key="base/scheduler/scheduler_config.json",
                      Body=(tiny / "sdxl-base" / "scheduler" / "scheduler_config.json").read_bytes() + b" ")
    assert holding_none.fingerprint("remote")["checkpoint"] == before  # read once a minute, not per request
    holding_none._identities = {source: (read - 61, identity)  # a minute on
                                for source, (read, identity) in holding_none._identities.items()}
    assert holding_none.fingerprint("remote")["checkpoint"] not in (before, None)
