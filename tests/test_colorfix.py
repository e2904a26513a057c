"""The tile ControlNet's colour fix (``deployments/support/colorfix.py``): the correction of each UNet output against
the extension's formulas written out in float64 in its own terms (``predict_start_from_noise`` and
``predict_noise_from_start`` of the LDM's cumulative alphas), and units that keep a generation's colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deployments.support.colorfix import ColorFix, blur
from deployments.support.control import ControlUnit, detect
from deployments.support.generation import GenerationRequest
from tests.helpers import pixels

SMALL = dict(prompt="a lighthouse", width=64, height=64, steps=4, guidance_scale=5.0, seed=5, sampler="Euler")


def box64(x: np.ndarray, k: int) -> np.ndarray:
    """A (2k + 1)² mean of every latent over the edge-replicated array (rows, channels, h, w), in float64."""
    padded = np.pad(x, ((0, 0), (0, 0), (k, k), (k, k)), mode="edge")
    height, width = x.shape[2:]
    out = np.zeros_like(x)
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            out += padded[:, :, dy:dy + height, dx:dx + width]
    return out / (2 * k + 1) ** 2


def extension(eps, xt, alpha, origin, k, sharpness, weight, cond_mark) -> np.ndarray:
    """The extension's hook, step by step, in float64."""
    recip, recipm1 = np.sqrt(1 / alpha), np.sqrt(1 / alpha - 1)
    x0_prd = recip * xt - recipm1 * eps  # predict_start_from_noise
    x0 = x0_prd - box64(x0_prd, k) + box64(origin, k)
    if sharpness is not None:
        detail = sharpness * 0.01
        neg = detail * box64(x0, k) + (1 - detail) * x0
        x0 = cond_mark * x0 + (1 - cond_mark) * neg
    eps_prd = (recip * xt - x0) / recipm1  # predict_noise_from_start
    w = max(0.0, min(1.0, weight))
    return eps_prd * w + eps * (1 - w)


def test_blur_is_the_extensions_box_average():
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    assert np.allclose(blur(x, 3).numpy(), box64(x.numpy(), 3), atol=1e-12)


@pytest.mark.parametrize("sharpness,weight", [(None, 1.0), (None, 0.4), (1.5, 1.0), (2.0, 1.7), (None, 0.0)])
def test_the_fix_is_the_extensions(sharpness, weight):
    rng = np.random.default_rng(0)
    eps, xt = rng.standard_normal((4, 4, 12, 10)), rng.standard_normal((4, 4, 12, 10))
    origin = rng.standard_normal((1, 4, 12, 10))
    alpha = 0.37
    uncond = torch.tensor([True, True, False, False])  # [uncond; cond], as under classifier-free guidance
    fix = ColorFix(torch.from_numpy(origin).float(), 5, sharpness, weight)
    got = fix.apply(torch.from_numpy(eps).float(), torch.from_numpy(xt).float(), torch.tensor(alpha), uncond).numpy()
    cond_mark = (~uncond).numpy().astype(np.float64).reshape(-1, 1, 1, 1)
    expected = extension(eps, xt, alpha, origin, 5, sharpness, weight, cond_mark)
    assert np.abs(got - expected).max() < 2e-4
    if weight == 0.0:
        assert np.array_equal(got, eps.astype(np.float32))


def test_its_map_is_the_image_itself(astronaut):
    for module in ("tile_colorfix", "tile_colorfix+sharp"):
        assert np.array_equal(pixels(detect(astronaut, module)), pixels(astronaut))


def test_its_sliders_are_the_extensions():
    plain = ControlUnit(model="c", module="tile_colorfix")
    assert (plain.threshold_a, plain.threshold_b) == (8.0, None)
    sharp = ControlUnit(model="c", module="tile_colorfix+sharp")
    assert (sharp.threshold_a, sharp.threshold_b) == (8.0, 1.0)
    for bad in ({"threshold_a": 2.0}, {"threshold_a": 33.0}, {"threshold_b": 2.5}):
        with pytest.raises(ValueError, match="outside tile_colorfix"):
            ControlUnit(model="c", module="tile_colorfix+sharp", **bad)


def test_a_colorfix_unit_carries_the_control_images_colours_into_the_latents(base, monkeypatch):
    """The final latents' low frequencies follow the control image's own latents with a colour-fix unit at weight
    1 (the last Euler step hands back the fixed clean estimate), where the same tile ControlNet without the fix
    leaves them as the sampling made them."""
    decoded: list[torch.Tensor] = []
    decode = base.decode
    monkeypatch.setattr(base, "decode", lambda latents, pipes=None: decoded.append(latents.float()) or decode(
        latents, pipes))
    red = Image.new("RGB", (64, 64), (200, 30, 20))
    pipe = base.checkpoint().txt2img
    with torch.no_grad():
        pixels_in = torch.from_numpy(np.asarray(red, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        target = pipe.vae.encode(pixels_in.to(pipe.vae.dtype)).latent_dist.mean.float() * pipe.vae.config.scaling_factor

    def final(module: str) -> torch.Tensor:
        decoded.clear()
        unit = ControlUnit(model="tiny-canny", image=red, module=module)
        base.generate(GenerationRequest(**SMALL, control=[unit]))
        return decoded[-1]

    plain, fixed = final("none"), final("tile_colorfix")
    off = [float((blur(x, 8) - blur(target, 8)).abs().mean()) for x in (plain, fixed)]
    assert off[1] < off[0] / 3, off  # 0.11 against 0.39
    # +sharp also blurs the unconditional rows' estimate (by a hundredth at its default 1), which guidance then
    # amplifies: another image, with the control image's colours still
    sharp = final("tile_colorfix+sharp")
    assert float((sharp - fixed).abs().mean()) > 0.01
    assert float((blur(sharp, 8) - blur(target, 8)).abs().mean()) < off[0] / 3


def test_each_unit_reads_its_sliders_and_a_hires_second_pass_blurs_twice_as_far(base):
    from deployments.support.colorfix import fixes

    pipe = base.checkpoint().txt2img
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    units = [ControlUnit(model="c", module="tile_colorfix", threshold_a=5),
             ControlUnit(model="c", module="tile_colorfix+sharp", threshold_b=0.5, conditioning_scale=1.5,
                         hires_pass=True)]
    made = fixes(pipe, units, [image, image])
    assert [(f.k, f.sharpness, f.weight) for f in made] == [(5, None, 1.0), (16, 0.5, 1.5)]
    assert made[0].latents.shape == (1, 4, 8, 8) and torch.equal(made[0].latents, made[1].latents)
