"""Small fakes of what the hires-mixing glue touches in Forge: KDiffusionSampler, CFGDenoiser, k-diffusion."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch

from lib_imgcond.mixing import forge_mixing as host
from lib_imgcond.mixing.blends import noise_scaling
from lib_imgcond.mixing.mixer import HiresMixer

SHAPE = (1, 4, 6, 6)


class FakePredictor:
    def __init__(self, prediction_type="epsilon"):
        self.prediction_type = prediction_type


class FakeDenoiser:
    """Like CFGDenoiserKDiffusion: callable (x, sigma, **extra_args), exposes inner_model.predictor and counts its
    calls in `step` (which Forge's prompt editing reads)."""

    def __init__(self, prediction_type="epsilon"):
        self.inner_model = SimpleNamespace(predictor=FakePredictor(prediction_type))
        self.calls: list[tuple[float, torch.Tensor]] = []
        self.step = 0
        self.steps_seen: list[int] = []

    def __call__(self, x, sigma, **extra_args):
        self.calls.append((float(sigma.reshape(-1)[0]), x.clone()))
        self.steps_seen.append(self.step)
        self.step += 1
        return x * 0.5  # a fixed, deterministic "denoised"


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0):
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        if callback is not None:
            callback({"x": x, "i": i})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0):
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_euler_ancestral_flux_check(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Reads model.inner_model.predictor like k-diffusion's Euler a does for Flux."""
    assert model.inner_model.predictor.prediction_type in ("epsilon", "const")
    return sample_euler(model, x, sigmas, extra_args, callback)


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    return x


def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None):
    return x


def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return x


class FakeSampler:
    """KDiffusionSampler.sample_img2img, reduced: inspect func's signature, noise the latent, launch func."""

    def __init__(self, func, prediction_type="epsilon"):
        self.func = func
        self.model_wrap_cfg = FakeDenoiser(prediction_type)
        self.flow = prediction_type == "const"

    def sample_img2img(self, x, noise, sigmas, t_enc, callback=None):
        sigma_sched = sigmas[len(sigmas) - 1 - t_enc - 1 :]
        xi = noise_scaling(sigma_sched[0], noise, x, self.flow)
        kwargs = {}
        if "sigmas" in inspect.signature(self.func).parameters:
            kwargs["sigmas"] = sigma_sched
        return self.func(self.model_wrap_cfg, xi, extra_args={"cond": None}, disable=False, callback=callback, **kwargs)


def fake_p(func=sample_euler, prediction_type="epsilon", **kw):
    engine = SimpleNamespace(
        is_sd1=prediction_type != "const",
        forge_objects=SimpleNamespace(
            unet=SimpleNamespace(model=SimpleNamespace(predictor=FakePredictor(prediction_type)))
        ),
    )
    p = SimpleNamespace(
        sd_model=engine,
        sampler=FakeSampler(func, prediction_type),
        is_hr_pass=True,
        enable_hr=True,
        seeds=[7],
        sampler_name="Euler",
        hr_sampler_name=None,
        modified_noise=None,
        extra_generation_params={},
    )
    p.comments = {}
    p.comment = lambda text: p.comments.__setitem__(text, 1)  # StableDiffusionProcessing.comment
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


SIGMAS = torch.tensor([14.6, 7.0, 3.1, 1.2, 0.4, 0.0])


def run(p, z_up, noise, params, t_enc=4, callback=None):
    mixers: list[HiresMixer] = []
    assert host.install(p, params, z_up, noise, on_mixer=mixers.append)
    out = p.sampler.sample_img2img(z_up, noise, SIGMAS, t_enc, callback)
    return out, mixers
