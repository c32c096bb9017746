import math

import pytest
import torch

from encdiff.diffusion import Diffusion


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_is_a_valid_decreasing_alpha_bar(schedule):
    d = Diffusion(schedule=schedule)
    ab = d.alphas_cumprod.double()
    assert ab.shape == (1000,) and d.betas.dtype == torch.float32
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] and ab[0] < 1
    assert (d.betas > 0).all() and (d.betas <= 0.999).all()
    torch.testing.assert_close(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000))


def test_linear_schedule_is_ldm_sqrt_linear():
    d = Diffusion(schedule="linear", linear_start=0.0015, linear_end=0.0155)
    assert d.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(0.0155, rel=1e-6)
    # linear in sqrt(beta): the middle sqrt is the mean of the end sqrts (T=1000 -> index 499.5)
    mid = (d.betas[499].sqrt() + d.betas[500].sqrt()) / 2
    assert mid.item() == pytest.approx((0.0015**0.5 + 0.0155**0.5) / 2, rel=1e-6)


def test_cosine_schedule_matches_closed_form():
    s = 8e-3
    d = Diffusion(schedule="cosine", cosine_s=s)

    def f(t):
        return math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 10, 250, 500, 900):
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5, abs=1e-7)
    assert d.betas[-1].item() == pytest.approx(0.999)  # clipped


def test_q_sample_statistics():
    d = Diffusion(schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    for t in (0, 300, 999):
        tt = torch.full((20000,), t)
        xt = d.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        ab = d.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(0.7 * ab**0.5, abs=0.03)
        assert xt.std().item() == pytest.approx((1 - ab) ** 0.5, rel=0.03, abs=0.003)


@pytest.mark.parametrize("loss", ["l1", "l2"])
def test_loss_values(loss):
    d = Diffusion(schedule="cosine", loss=loss)
    x0 = torch.randn(64, 3, 16, 16)
    g = torch.Generator().manual_seed(1)

    # a perfect noise predictor: recovers the noise from x_t and the x0 it closes over
    def oracle(x_t, t, ctx):
        assert ctx == "tokens"
        return (x_t - d.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0) / d.sqrt_one_minus_alphas_cumprod[t].view(
            -1, 1, 1, 1
        )

    assert d.loss(oracle, x0, "tokens", generator=g).item() < 1e-3
    # a zero predictor (the zero-initialised head): E|N(0,1)| = sqrt(2/pi), E N(0,1)^2 = 1
    zero = d.loss(lambda x, t: torch.zeros_like(x), x0, generator=g).item()
    assert zero == pytest.approx(math.sqrt(2 / math.pi) if loss == "l1" else 1.0, rel=0.03)
    # given t and noise the value is exact
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = d.loss(lambda x, tt: 0.5 * x, x0, t=t, noise=noise)
    err = 0.5 * d.q_sample(x0, t, noise) - noise
    expected = err.abs().mean() if loss == "l1" else err.square().mean()
    torch.testing.assert_close(out, expected)


def test_loss_draws_uniform_t():
    d = Diffusion()
    seen = []
    d.loss(lambda x, t: seen.append(t) or x, torch.zeros(50000, 1))
    counts = torch.bincount(seen[0], minlength=1000).float()
    assert seen[0].min() >= 0 and seen[0].max() < 1000
    assert counts.std() / counts.mean() < 0.5  # ~ 1/sqrt(50) for uniform


def test_t_power_zero_is_the_plain_uniform_draw():
    # the default must draw exactly what torch.randint draws, so runs made before t_power repeat
    t = Diffusion().sample_timesteps(1000, torch.Generator().manual_seed(3))
    assert torch.equal(t, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("power", [0.5, 1.0, 3.0])
def test_t_power_draws_density_proportional_to_t_to_the_power(power):
    t = Diffusion(t_power=power).sample_timesteps(200000, torch.Generator().manual_seed(0)).double()
    assert t.min() >= 0 and t.max() <= 999
    s = (t + 0.5) / 1000
    # moments of the density (p + 1) s^p on [0, 1): E[s] = (p+1)/(p+2), P(s < 1/2) = 2^-(p+1)
    assert s.mean().item() == pytest.approx((power + 1) / (power + 2), abs=3e-3)
    assert (s < 0.5).double().mean().item() == pytest.approx(0.5 ** (power + 1), abs=3e-3)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddim_with_oracle_recovers_x0(schedule, eta, prediction):
    d = Diffusion(schedule=schedule, prediction=prediction)
    x0 = torch.randn(4, 3, 8, 8).clamp(-2, 2)
    g = torch.Generator().manual_seed(0)
    out = d.ddim_sample(oracle_for(d, x0), x0.shape, context=object(), steps=50, eta=eta, generator=g)
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=1e-3)


def test_ddim_eta1_all_steps_has_ddpm_posterior_variance():
    d = Diffusion(schedule="linear")
    ts, a, a_prev, sigma = d.ddim_coefficients(1000, eta=1.0)
    assert ts.tolist() == list(range(1000))
    ab = d.alphas_cumprod.double()
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    posterior = (1 - ab_prev) / (1 - ab) * d.betas.double()
    torch.testing.assert_close(sigma.double() ** 2, posterior, rtol=1e-3, atol=1e-8)
    assert d.ddim_timesteps(200).tolist() == list(range(0, 1000, 5))


def test_ddim_is_reproducible_with_a_generator():
    d = Diffusion()

    def model(x, t):
        return 0.1 * x

    a = d.ddim_sample(model, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(3))
    b = d.ddim_sample(model, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(3))
    c = d.ddim_sample(model, (2, 3, 4, 4), steps=10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_traces_without_graph_breaks():
    # dynamo alone (backend "eager") finds graph breaks and host syncs without inductor's codegen cost
    d = Diffusion(loss="l1")
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    step = torch.compile(lambda x0: d.loss(lambda x, t: conv(x), x0), fullgraph=True, backend="eager")
    x0 = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(step(x0)) and torch.isfinite(step(x0 + 1))


def oracle_for(d, x0):
    """The exact prediction (d.prediction) of a model that knows x0."""

    def oracle(x_t, t, ctx=None):
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        eps = (x_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
        out = {"eps": eps, "x0": x0.double(), "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0.double()}[d.prediction]
        return out.float()

    return oracle


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_each_prediction_target_is_what_a_model_knowing_x0_outputs(prediction):
    d = Diffusion(schedule="cosine", prediction=prediction)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(256, 3, 4, 4, generator=g)
    t = torch.randint(0, 1000, (256,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    # against float64 formulas, written independently of Diffusion.target
    ab = d.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected = {
        "eps": noise.double(),
        "x0": x0.double(),
        "v": ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double(),
    }[prediction]
    torch.testing.assert_close(d.target(x0, t, noise).double(), expected, atol=1e-5, rtol=1e-5)
    assert d.loss(oracle_for(d, x0), x0, t=t, noise=noise).item() < 1e-6
    # to_x0_eps inverts the prediction at every step (away from t = T-1, where alpha_bar ~ 0 makes eps->x0 ill-posed)
    for step in (0, 100, 500, 900):
        a = d.alphas_cumprod[step]
        tt = torch.full((256,), step)
        got_x0, got_eps = d.to_x0_eps(d.q_sample(x0, tt, noise), a, d.target(x0, tt, noise))
        torch.testing.assert_close(got_x0, x0, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got_eps, noise, atol=2e-3, rtol=1e-3)


def test_v_loss_weights_low_snr_steps_more_than_eps_loss():
    """The same x0 error costs eps-prediction SNR x err and v-prediction (SNR + 1) x err."""
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(64, 3, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    wrong_x0 = x0 + 0.5  # every model below is off by 0.5 in x0
    t = torch.full((64,), 950)  # low SNR
    costs = {}
    for prediction in ("eps", "v"):
        d = Diffusion(prediction=prediction)
        costs[prediction] = d.loss(oracle_for(d, wrong_x0), x0, t=t, noise=noise).item()
    snr = (d.alphas_cumprod[950] / (1 - d.alphas_cumprod[950])).item()
    assert costs["eps"] == pytest.approx(0.25 * snr, rel=1e-3)
    assert costs["v"] == pytest.approx(0.25 * (snr + 1), rel=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(schedule="quadratic"),
        dict(loss="huber"),
        dict(timesteps=0),
        dict(prediction="score"),
        dict(t_power=-1.0),
        dict(t_power=math.inf),
        dict(schedule="linear", linear_start=0.02, linear_end=0.01),
    ],
)
def test_bad_config_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        Diffusion(**kwargs)


def test_bad_ddim_steps_raises_value_error():
    with pytest.raises(ValueError):
        Diffusion(timesteps=100).ddim_sample(lambda x, t: x, (1, 1), steps=200)


@pytest.mark.parametrize("prediction,loss", [("eps", "l1"), ("v", "l2"), ("x0", "l2")])
def test_the_training_step_regresses_the_configured_target(prediction, loss):
    """EncDiff.forward (the step train.py runs) and Diffusion.loss agree for every prediction."""
    from encdiff.config import EncDiffConfig
    from encdiff.models.encdiff import EncDiff, build_diffusion, build_encoder, build_unet

    e = EncDiffConfig(
        encoder_ch=8,
        model_channels=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_levels=[1],
        num_heads=2,
        num_tokens=4,
        token_dim=8,
        prediction=prediction,
        loss=loss,
    )
    torch.manual_seed(0)
    model = EncDiff(build_encoder(e), build_unet(e, 3, "math"), build_diffusion(e)).eval()
    assert model.diffusion.prediction == prediction
    g = torch.Generator().manual_seed(7)
    images = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    z0 = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    _, tokens = model.encoder(images)
    expected = model.diffusion.loss(model.unet, z0, tokens, t=t, noise=noise)
    torch.testing.assert_close(model(images, z0, t, noise), expected)
    # and the U-Net's output head starts at zero: the first loss is the target's own mean size
    if prediction == "eps" and loss == "l1":
        assert expected.item() == pytest.approx(noise.abs().mean().item(), rel=1e-5)
