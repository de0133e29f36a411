import numpy as np
import pytest
import torch
from torch import nn

from innercontrol.controlled_unet import ControlledUNet
from innercontrol.losses import (
    LossWeights,
    alignment_loss,
    corrective_noise,
    corrective_rows,
    diffusion_loss,
    diffusion_target,
    in_window,
    innercontrol_objective,
    predict_x0,
    reward_loss,
    sample_timesteps,
    timestep_weights,
    window_indices,
)
from innercontrol.probes import build_probe
from innercontrol.reward import SplitReward

from .helpers import IdentityNormCondition, frozen_conv_condition, load_tiny_components


class CountingVAE(nn.Module):
    """Decoder stand-in: latents (B,4,h,w) -> image (B,3,2h,2w) in [-1,1]; records decoded batch sizes."""

    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"scaling_factor": 0.5})()
        self.decoded = []

    @property
    def dtype(self):
        return torch.float32

    def decode(self, latents, return_dict=False):
        self.decoded.append(latents.shape[0])
        image = torch.tanh(latents[:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2)
        return (image,)


def test_in_window_is_inclusive():
    t = torch.tensor([0, 200, 201, 400, 999])
    assert in_window(t, (0, 200)).tolist() == [True, True, False, False, False]
    assert in_window(t, (200, 400)).tolist() == [False, True, True, True, False]


def test_timestep_sampling_uniform_and_cubic():
    torch.manual_seed(0)
    uniform = sample_timesteps(200_000, 1000, "uniform")
    torch.manual_seed(0)
    assert torch.equal(uniform, torch.randint(0, 1000, (200_000,)))  # the published sampling, unchanged
    cubic = sample_timesteps(200_000, 1000, "cubic")
    assert cubic.dtype == torch.long and 0 <= int(cubic.min()) and int(cubic.max()) <= 999
    # t = (1 - u^3) T: P(t >= T/2) = P(u^3 <= 1/2) = 0.5^(1/3) = 0.7937; E[t] = (1 - 1/4) T = 750 (minus 0.5 for
    # flooring); the uniform draw puts half above T/2 and its mean at 499.5.
    assert abs((cubic >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.005
    assert abs(cubic.double().mean().item() - 749.5) < 2.0
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.005
    with pytest.raises(ValueError, match="unknown timestep sampling 'logit'"):
        sample_timesteps(4, 1000, "logit")


def test_v_weighting_of_the_diffusion_loss_by_hand():
    """loss.diffusion_weighting=v: epsilon MSE x min(1 / alpha_bar_t, cap) / mean over t; uniform: the plain mean."""
    alphas = torch.tensor([1.0, 0.5, 0.1, 0.01])
    t = torch.tensor([0, 3, 2, 1])
    assert timestep_weights(t, alphas, "uniform") is None
    # factors 1, 2, 10, min(100, 50) = 50; their mean 63 / 4
    weights = timestep_weights(t, alphas, "v", cap=50.0)
    assert torch.allclose(weights, torch.tensor([1.0, 50.0, 10.0, 2.0]) / 15.75)
    # a v-prediction model's MSE is already epsilon MSE / alpha_bar: x alpha_bar, 1 1 1 0.5, over their mean 0.875
    v_weights = timestep_weights(t, alphas, "v", cap=50.0, prediction_type="v_prediction")
    assert torch.allclose(v_weights, torch.tensor([1.0, 0.5, 1.0, 1.0]) / 0.875)
    # ... and its plain MSE when nothing is truncated
    assert torch.allclose(timestep_weights(t, alphas, "v", cap=1e3, prediction_type="v_prediction"), torch.ones(4))
    with pytest.raises(ValueError, match="unknown diffusion weighting 'snr'"):
        timestep_weights(t, alphas, "snr")
    # per-sample MSEs 1, 4, 0, 9 (2 elements each), weighted and averaged over the batch
    pred = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0], [3.0, -3.0]])
    target = torch.zeros(4, 2)
    expected = (1 * 1 + 50 * 4 + 10 * 0 + 2 * 9) / 15.75 / 4
    assert diffusion_loss(pred, target, weights).item() == pytest.approx(expected)
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 4 + 0 + 9) / 4)


def test_v_weighting_is_the_implied_v_error_below_the_cap():
    """Independent check on SD's schedule: with a cap above every 1 / alpha_bar_t, the weighted epsilon MSE equals
    the MSE between the v the scheduler defines and the v implied by the predicted epsilon, over the same mean."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    x0, noise, eps_hat = torch.randn(3, 5, 4, 2, 2).unbind(0)
    t = torch.tensor([0, 400, 800, 999, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v_hat = a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    v = scheduler.get_velocity(x0, noise, t)
    per_sample_v = (v_hat - v).square().flatten(1).mean(1)
    norm = (1 / scheduler.alphas_cumprod).mean()
    weights = timestep_weights(t, scheduler.alphas_cumprod, "v", cap=1e6)
    assert torch.allclose(weights * (eps_hat - noise).square().flatten(1).mean(1), per_sample_v / norm, rtol=1e-4)
    assert diffusion_loss(eps_hat, noise, weights).item() == pytest.approx((per_sample_v / norm).mean().item(), 1e-4)
    # SD's schedule: 1 / alpha_bar runs from 1.0 to 215, so t = 999 weighs ~200x t = 0 without a cap
    assert 200 < (weights[3] / weights[0]).item() < 230
    capped = timestep_weights(t, scheduler.alphas_cumprod, "v", cap=50.0)
    assert capped[3] == capped[4] and torch.isclose(capped[3], capped[2] * 50 * scheduler.alphas_cumprod[800])


def test_objective_applies_the_configs_diffusion_weighting():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from innercontrol.config import load_config

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 2, 2).unbind(0)
    t = torch.tensor([10, 500, 990])
    out = SimpleNamespace(noise_pred=pred)
    published = LossWeights.from_config(load_config(overrides=["loss.reward_weight=0", "loss.alignment_weight=0"]).loss)
    assert published.diffusion_weighting == "uniform"
    plain = innercontrol_objective(out, target, pred, t, None, published, scheduler)
    assert plain["loss"].item() == pytest.approx((pred - target).square().mean().item())
    cfg = load_config(
        overrides=["loss.reward_weight=0", "loss.alignment_weight=0", "loss.diffusion_weighting=v",
                   "loss.diffusion_weight_max=20"]
    )  # fmt: skip
    weighted = innercontrol_objective(out, target, pred, t, None, LossWeights.from_config(cfg.loss), scheduler)
    factor = (1 / scheduler.alphas_cumprod).clamp(max=20)
    per_sample = (pred - target).square().mean(dim=(1, 2, 3))
    expected = (factor[t] / factor.mean() * per_sample).mean()
    assert weighted["loss"].item() == pytest.approx(expected.item()) and weighted["diffusion"] == weighted["loss"]


def test_objective_scales_the_diffusion_term_by_diffusion_weight():
    """loss.diffusion_weight multiplies the denoising term in the sum (the logged term stays unweighted); the
    alignment term, from a stand-in probe whose per-sample error is known, keeps its own weight."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from innercontrol.config import load_config

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 2, 2).unbind(0)
    t = torch.tensor([10, 990, 500])  # 990 lies outside the alignment window [0, 920]
    scaled = LossWeights.from_config(load_config(overrides=["loss.reward_weight=0", "loss.diffusion_weight=0.25"]).loss)
    assert (scaled.diffusion_weight, scaled.alignment_weight) == (0.25, 1.0)
    # The probe's "features" are each sample's error: it returns 2 sqrt(e) - 1 everywhere, which the objective maps
    # back to sqrt(e) in [0, 1], whose MSE against an all-zero control is e.
    errors = torch.tensor([0.5, 0.3, 0.7]).view(3, 1, 1, 1)
    out = SimpleNamespace(noise_pred=pred, features=[errors], time_embedding=torch.zeros(3, 1))

    def probe(features, embedding):
        return (2 * features[0].sqrt() - 1).expand(-1, 1, 2, 2)

    identity = IdentityNormCondition()
    control = torch.zeros(3, 1, 2, 2)
    terms = innercontrol_objective(out, target, pred, t, control, scaled, scheduler, None, identity, probe)
    mse = (pred - target).square().mean().item()
    assert terms["diffusion"].item() == pytest.approx(mse)  # logged before its weight
    # samples 0 and 2 (t = 10, 500): errors 0.5 and 0.7
    assert terms["alignment_samples"].item() == 2 and terms["alignment"].item() == pytest.approx(0.6)
    assert terms["loss"].item() == pytest.approx(0.25 * mse + 0.6)
    published = LossWeights.from_config(load_config(overrides=["loss.reward_weight=0"]).loss)
    full = innercontrol_objective(out, target, pred, t, control, published, scheduler, None, identity, probe)
    assert full["loss"].item() == pytest.approx(mse + 0.6)


def test_diffusion_loss_and_targets_by_hand():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    assert diffusion_loss(pred, target).item() == pytest.approx((1 + 0 + 4 + 16) / 4)
    from diffusers import DDPMScheduler

    eps = DDPMScheduler(num_train_timesteps=1000)
    v = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([3, 900])
    assert torch.equal(diffusion_target(eps, x0, noise, t), noise)
    a = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(diffusion_target(v, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)


def test_predict_x0_inverts_the_forward_process():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, eps, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(predict_x0(x_t, eps, t, alphas), x0, atol=1e-4)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(predict_x0(x_t, v, t, alphas, "v_prediction"), x0, atol=1e-5)


def _reward_case(timesteps):
    torch.manual_seed(0)
    b = len(timesteps)
    return dict(
        noisy_latents=torch.randn(b, 4, 4, 4),
        model_pred=torch.randn(b, 4, 4, 4),
        timesteps=torch.tensor(timesteps),
        control=torch.rand(b, 3, 8, 8),
        alphas_cumprod=torch.linspace(0.999, 0.01, 1000),
    )


def test_reward_loss_by_hand_and_subset_equals_whole_batch():
    case = _reward_case([50, 600, 150, 999])
    condition = IdentityNormCondition()
    vae = CountingVAE()
    loss, count = reward_loss(vae=vae, condition=condition, window=(0, 200), **case)
    assert count == 2 and vae.decoded == [2]
    # By hand: x0 from eps, decode, identity condition, per-sample MSE, mean over samples 0 and 2.
    a = case["alphas_cumprod"][case["timesteps"]].view(-1, 1, 1, 1)
    x0 = (case["noisy_latents"] - (1 - a).sqrt() * case["model_pred"]) / a.sqrt()
    image = (torch.tanh(x0[:, :3] / 0.5).repeat_interleave(2, -1).repeat_interleave(2, -2) / 2 + 0.5).clamp(0, 1)
    per_sample = ((image - case["control"]) ** 2).flatten(1).mean(1).numpy()
    assert loss.item() == pytest.approx(float(np.mean(per_sample[[0, 2]])), rel=1e-5)
    whole, whole_count = reward_loss(vae=vae, condition=condition, window=(0, 200), subset=False, **case)
    assert vae.decoded == [2, 4] and whole_count == 2
    assert torch.allclose(loss, whole, rtol=1e-6)


def test_reward_with_no_in_window_sample_costs_no_decode():
    case = _reward_case([500, 900])
    vae, calls = CountingVAE(), []
    condition = IdentityNormCondition(lambda x: calls.append(x) or x)
    loss, count = reward_loss(vae=vae, condition=condition, window=(0, 200), **case)
    assert count == 0 and loss.item() == 0.0
    assert vae.decoded == [] and calls == []
    # The anchors' way decodes the whole batch whatever the window holds, and masks everything out.
    whole, whole_count = reward_loss(vae=vae, condition=condition, window=(0, 200), subset=False, **case)
    assert whole_count == 0 and whole.item() == 0.0 and vae.decoded == [2]


def test_window_indices_read_the_host_copy_not_the_device_tensor():
    on_device = torch.empty(3, device="meta")  # cannot be read back: proves the host copy is used
    assert window_indices(on_device, (0, 200), host_timesteps=torch.tensor([5, 300, 200])) == [0, 2]
    assert window_indices(torch.tensor([5, 300, 200]), (0, 200)) == [0, 2]


@pytest.mark.parametrize("loss_scale", [None, 2.0**10])
@pytest.mark.parametrize("timesteps", [[50, 600, 150, 999], [10, 20, 30, 40]])
def test_split_reward_has_the_value_and_gradient_of_the_direct_reward(timesteps, loss_scale):
    case = _reward_case(timesteps)
    condition = frozen_conv_condition()
    scaler = None if loss_scale is None else torch.amp.GradScaler("cpu", init_scale=loss_scale)
    pred = case.pop("model_pred").requires_grad_(True)
    direct, count = reward_loss(model_pred=pred, vae=CountingVAE(), condition=condition, window=(0, 200), **case)
    (direct_grad,) = torch.autograd.grad(direct, pred)
    vae = CountingVAE()
    split = SplitReward(vae, condition, cuda_graph=True, scaler=scaler)  # cuda_graph is ignored on the CPU
    term, split_count = reward_loss(model_pred=pred, vae=vae, condition=condition, window=(0, 200), split=split, **case)
    assert split_count == count and vae.decoded == [count]  # one eager pass over the in-window samples
    assert term.item() == pytest.approx(direct.item(), rel=1e-6)
    (split_grad,) = torch.autograd.grad(term, pred)
    assert split_grad.abs().sum() > 0
    assert torch.allclose(split_grad, direct_grad, rtol=1e-5, atol=1e-9)
    outside = [i for i, t in enumerate(timesteps) if t > 200]
    assert torch.count_nonzero(split_grad[outside]) == 0


def test_split_reward_pass_ignores_outer_saved_tensor_hooks():
    case = _reward_case([50, 100])
    condition = frozen_conv_condition()
    pred = case.pop("model_pred").requires_grad_(True)
    kept = {}
    for split in (None, SplitReward(CountingVAE(), condition)):
        packed = kept.setdefault(split is not None, [])
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, packed=packed: packed.append(t.shape) or t, lambda t: t
        ):
            term, _ = reward_loss(
                model_pred=pred, vae=CountingVAE(), condition=condition, window=(0, 200), split=split, **case
            )
        term.backward()
    # Kept for the outer backward: the direct reward keeps decoder/condition tensors at the image size (8x8); the
    # split one only latent-sized ones (its pass ran its own backward already).
    assert any(shape[-1] == 8 for shape in kept[False])
    assert kept[True] and all(shape[-1] <= 4 for shape in kept[True])
    assert pred.grad.abs().sum() > 0


class FixedProbe:
    """Probe stand-in returning a given map for the samples it is asked about (records batch sizes)."""

    def __init__(self, maps):
        self.maps, self.calls = maps, []

    def __call__(self, features, time_embedding):
        self.calls.append(features[0].shape[0])
        index = features[0][:, 0, 0, 0].long()  # the tests store the sample index in the first feature
        return self.maps[index]


def test_alignment_loss_by_hand_with_resize_and_window():
    torch.manual_seed(0)
    b = 3
    maps = torch.rand(b, 3, 4, 4) * 2 - 1
    features = [torch.arange(b).float().view(b, 1, 1, 1).expand(b, 2, 4, 4).clone()]
    control = torch.rand(b, 3, 8, 8)
    probe = FixedProbe(maps)
    loss, count = alignment_loss(
        probe, features, torch.zeros(b, 4), control, torch.tensor([100, 950, 920]), IdentityNormCondition(), (0, 920)
    )
    assert count == 2 and probe.calls == [2]
    upsampled = torch.nn.functional.interpolate((maps + 1) / 2, size=(8, 8), mode="bilinear", align_corners=False)
    per_sample = ((upsampled - control) ** 2).flatten(1).mean(1)
    assert loss.item() == pytest.approx(((per_sample[0] + per_sample[2]) / 2).item(), rel=1e-6)
    none, zero = alignment_loss(
        probe, features, torch.zeros(b, 4), control, torch.tensor([950, 999, 921]), IdentityNormCondition(), (0, 920)
    )
    assert zero == 0 and none.item() == 0 and probe.calls == [2]


def _training_setup(tiny_dir):
    from transformers import CLIPTextModel

    from innercontrol.controlled_unet import tapped_channels
    from innercontrol.tiny import tiny_tokenizer

    unet, controlnet, vae, scheduler = load_tiny_components(tiny_dir)
    text_encoder = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
    torch.manual_seed(0)
    probe = build_probe(tapped_channels(unet, "attn"), 32, 64).requires_grad_(False).eval()
    condition = frozen_conv_condition()
    ids = tiny_tokenizer()(["a red circle", "a blue square"], padding="max_length", return_tensors="pt").input_ids
    return ControlledUNet(unet, controlnet, "attn"), vae, text_encoder, scheduler, probe, condition, ids


def _step_inputs(vae, scheduler):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    control = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.tensor([120, 600])
    return latents, noise, timesteps, control


@pytest.mark.parametrize("split", [False, True], ids=["reward_in_graph", "split_reward"])
def test_gradient_contract_only_controlnet_learns(tiny_dir, split):
    model, vae, text_encoder, scheduler, probe, condition, ids = _training_setup(tiny_dir)
    frozen = {
        "unet": model.unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "probe": probe,
        "condition": condition.model,
    }
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    controlnet_before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    optimizer = torch.optim.AdamW(model.controlnet.parameters(), lr=1e-3)
    latents, noise, timesteps, control = _step_inputs(vae, scheduler)
    with torch.no_grad():
        text = text_encoder(ids)[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    out = model(noisy, timesteps, text, control)
    weights = LossWeights(0.5, (0, 400), 1.0, (0, 920))
    terms = innercontrol_objective(
        out,
        diffusion_target(scheduler, latents, noise, timesteps),
        noisy,
        timesteps,
        control,
        weights,
        scheduler,
        vae,
        condition,
        probe,
        SplitReward(vae, condition) if split else None,
        timesteps,
    )
    assert terms["reward_samples"].item() == 1 and terms["alignment_samples"].item() == 2
    expected = terms["diffusion"] + 0.5 * terms["reward"] + 1.0 * terms["alignment"]
    assert torch.allclose(terms["loss"], expected)
    terms["loss"].backward()
    for name, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), f"{name} received a gradient"
    assert all(p.grad is not None for p in model.controlnet.parameters() if p.requires_grad)
    optimizer.step()
    for name, module in frozen.items():
        after = module.state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), f"{name} changed"
    changed = [not torch.equal(controlnet_before[k], v) for k, v in model.controlnet.state_dict().items()]
    assert any(changed)


@pytest.mark.parametrize("term", ["alignment", "reward"])
def test_each_window_term_alone_sends_gradient_to_controlnet(tiny_dir, term):
    model, vae, text_encoder, scheduler, probe, condition, ids = _training_setup(tiny_dir)
    latents, noise, timesteps, control = _step_inputs(vae, scheduler)
    with torch.no_grad():
        text = text_encoder(ids)[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    out = model(noisy, timesteps, text, control)
    if term == "alignment":
        loss, _ = alignment_loss(probe, out.features, out.time_embedding, control, timesteps, condition, (0, 920))
    else:
        loss, _ = reward_loss(
            noisy, out.noise_pred, timesteps, control, vae, condition, scheduler.alphas_cumprod, (0, 400)
        )
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in model.controlnet.parameters() if p.grad is not None)
    assert torch.isfinite(grad) and grad > 0


def test_split_reward_gives_the_controlnet_the_same_gradient(tiny_dir):
    model, vae, text_encoder, scheduler, probe, condition, ids = _training_setup(tiny_dir)
    latents, noise, timesteps, control = _step_inputs(vae, scheduler)
    with torch.no_grad():
        text = text_encoder(ids)[0]
    noisy = scheduler.add_noise(latents, noise, timesteps)
    grads, values = [], []
    for split in (None, SplitReward(vae, condition)):
        model.controlnet.zero_grad(set_to_none=True)
        out = model(noisy, timesteps, text, control)
        loss, count = reward_loss(
            noisy, out.noise_pred, timesteps, control, vae, condition, scheduler.alphas_cumprod, (0, 400), split=split
        )
        loss.backward()
        values.append(loss.item())
        grads.append([p.grad.clone() for p in model.controlnet.parameters() if p.grad is not None])
    assert count == 1 and values[1] == pytest.approx(values[0], rel=1e-6)
    assert len(grads[0]) == len(grads[1]) > 0
    for direct, split in zip(*grads):
        assert torch.allclose(split, direct, rtol=1e-4, atol=1e-10)


def test_reward_chunk_sizes_are_powers_of_two_up_to_the_limit():
    from innercontrol.reward import chunk_sizes

    assert chunk_sizes(0, 4) == []
    assert chunk_sizes(3, 4) == [2, 1]
    assert chunk_sizes(7, 4) == [4, 2, 1]
    assert chunk_sizes(8, 4) == [4, 4]
    assert chunk_sizes(6, 1) == [1] * 6
    assert chunk_sizes(5, 3) == [2, 2, 1]  # a limit that is not a power of two rounds down
    for count in range(20):
        for limit in (1, 2, 3, 4, 8):
            sizes = chunk_sizes(count, limit)
            assert sum(sizes) == count and all(s <= limit and s & (s - 1) == 0 for s in sizes)


class _InfBackward(torch.autograd.Function):
    """Identity whose backward overflows (what an fp16 inner backward at too high a loss scale produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_split_reward_value_stays_finite_when_its_backward_overflows():
    case = _reward_case([50, 100, 900])
    condition = IdentityNormCondition(_InfBackward.apply)
    pred = case.pop("model_pred").requires_grad_(True)
    direct, _ = reward_loss(model_pred=pred, vae=CountingVAE(), condition=condition, window=(0, 200), **case)
    split = SplitReward(CountingVAE(), condition)
    term, _ = reward_loss(model_pred=pred, vae=split.vae, condition=condition, window=(0, 200), split=split, **case)
    # The loss value is the reward (finite), so the non-finite-loss guard does not stop training ...
    assert torch.isfinite(term) and term.item() == pytest.approx(direct.item(), rel=1e-6)
    # ... and the overflow reaches the trainable side's gradient, where the GradScaler finds it and skips the step.
    (grad,) = torch.autograd.grad(term, pred)
    assert not torch.isfinite(grad[:2]).all() and torch.count_nonzero(grad[2]) == 0


def test_row_indexer_slices_consecutive_rows_and_gathers_the_rest():
    from innercontrol.reward import row_indexer

    x = torch.arange(5)
    assert row_indexer([0, 1, 2, 3, 4], x.device) == slice(0, 5)  # the whole batch: no gather copy
    assert row_indexer([2, 3], x.device) == slice(2, 4)
    gathered = row_indexer([0, 2, 4], x.device)
    assert isinstance(gathered, torch.Tensor) and x[gathered].tolist() == [0, 2, 4]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_corrective_noise_shows_another_image_and_keeps_the_target_on_its_own(prediction_type):
    """loss.corrective_fraction: a chosen row's noisy latent is sqrt(a) * (the previous row's latent) + sqrt(1 - a) *
    its noise, by hand; the target built from the returned noise (epsilon or v) predicts the row's own latent as x0;
    rows not chosen keep their noise bit for bit, and a batch of one has no other image to show."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    alphas = scheduler.alphas_cumprod
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 8, 8).unbind(0)
    t = torch.tensor([100, 600, 800, 999])
    rows = torch.tensor([False, True, True, False])
    shifted = corrective_noise(latents, noise, t, alphas, rows)
    assert torch.equal(shifted[0], noise[0]) and torch.equal(shifted[3], noise[3])
    noisy = scheduler.add_noise(latents, shifted, t)
    for row, other in ((1, 0), (2, 1)):
        a = alphas[t[row]]
        by_hand = a.sqrt() * latents[other] + (1 - a).sqrt() * noise[row]
        assert torch.allclose(noisy[row], by_hand, atol=1e-5)
        assert not torch.allclose(noisy[row], scheduler.add_noise(latents, noise, t)[row], atol=1e-2)
    target = diffusion_target(scheduler, latents, shifted, t)
    x0 = predict_x0(noisy, target, t, alphas, prediction_type)
    assert torch.allclose(x0, latents, atol=1e-4)
    one = corrective_noise(latents[:1], noise[:1], t[1:2], alphas, torch.tensor([True]))
    assert torch.equal(one, noise[:1])


def test_corrective_rows_choose_in_window_samples_at_the_fraction_and_draw_nothing_at_zero():
    t = torch.arange(1000).repeat(4)  # every t four times
    state = torch.get_rng_state()
    none = corrective_rows(t, 0.0, (500, 999))
    assert not none.any() and torch.equal(torch.get_rng_state(), state)  # the published path draws nothing
    every = corrective_rows(t, 1.0, (500, 999))
    assert torch.equal(every, (t >= 500) & (t <= 999))
    torch.manual_seed(0)
    half = corrective_rows(t, 0.5, (300, 700))
    assert not half[(t < 300) | (t > 700)].any()
    inside = half[(t >= 300) & (t <= 700)].float().mean().item()
    assert 0.45 < inside < 0.55  # 1604 in-window samples: 0.5 +- 0.025 is 2 standard deviations
    assert LossWeights.from_config(load_published_loss()).corrective_fraction == 0.0


def load_published_loss():
    from innercontrol.config import load_config

    return load_config().loss
