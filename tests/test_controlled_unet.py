import pytest
import torch

from innercontrol.controlled_unet import ControlledUNet, tap_decoder_features, tapped_channels, tapped_modules
from innercontrol.tiny import SD15_UNET_CONFIG, UNET_CONFIG

from .helpers import load_tiny_components


def _inputs(batch=2, latent=16, text_dim=32, image=128):
    torch.manual_seed(0)
    return (
        torch.randn(batch, 4, latent, latent),
        torch.tensor([10, 700][:batch]),
        torch.randn(batch, 7, text_dim),
        torch.rand(batch, 3, image, image),
    )


def test_sd15_architecture_tap_shapes():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    assert tapped_channels(unet, "attn") == [1280] * 3 + [640] * 3 + [320] * 3
    assert tapped_channels(unet, "conv") == [1280] * 6 + [640] * 3 + [320] * 3
    sample = torch.randn(1, 4, 16, 16)  # 128 px image
    text = torch.randn(1, 4, 768)
    for tap, channels, sizes in [
        ("attn", [1280] * 3 + [640] * 3 + [320] * 3, [4] * 3 + [8] * 3 + [16] * 3),
        ("conv", [1280] * 6 + [640] * 3 + [320] * 3, [2] * 3 + [4] * 3 + [8] * 3 + [16] * 3),
    ]:
        with torch.no_grad(), tap_decoder_features(unet, tap) as features:
            unet(sample, torch.tensor([500]), encoder_hidden_states=text)
        assert [f.shape[1] for f in features] == channels
        assert [f.shape[-1] for f in features] == sizes
        assert all(f.shape[0] == 1 and f.shape[-2] == f.shape[-1] for f in features)


def test_attn_tap_is_attn1_output_before_residual(tiny_dir):
    unet, *_ = load_tiny_components(tiny_dir)
    first = unet.up_blocks[1].attentions[0].transformer_blocks[0].attn1
    seen = []
    handle = first.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    sample, t, text, _ = _inputs()
    with torch.no_grad(), tap_decoder_features(unet, "attn") as features:
        unet(sample, t, encoder_hidden_states=text)
    handle.remove()
    batch, tokens, channels = seen[0].shape
    side = int(tokens**0.5)
    assert torch.equal(features[0], seen[0].transpose(1, 2).reshape(batch, channels, side, side))


def test_hooks_do_not_leak(tiny_dir):
    unet, controlnet, *_ = load_tiny_components(tiny_dir)
    model = ControlledUNet(unet, controlnet, tap="attn")
    sample, t, text, control = _inputs()
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()]
    with torch.no_grad():
        first = model(sample, t, text, control)
        second = model(sample, t, text, control)
    after = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules()]
    assert before == after
    assert len(first.features) == len(second.features) == 9
    # An untapped call after tapped ones captures nothing.
    with torch.no_grad():
        plain = model(sample, t, text, control, tap=None)
    assert plain.features == []
    assert torch.allclose(plain.noise_pred, first.noise_pred)
    assert first.time_embedding.shape == (2, UNET_CONFIG["block_out_channels"][0] * 4)


def test_tap_channels_match_tiny(tiny_dir):
    unet, controlnet, *_ = load_tiny_components(tiny_dir)
    assert len(tapped_modules(unet, "attn")) == 9
    assert len(tapped_modules(unet, "conv")) == 12
    model = ControlledUNet(unet, controlnet, tap="conv")
    sample, t, text, control = _inputs()
    with torch.no_grad():
        out = model(sample, t, text, control)
    assert [f.shape[1] for f in out.features] == tapped_channels(unet, "conv")
    with pytest.raises(ValueError, match="unknown tap mode 'mlp'"):
        tapped_modules(unet, "mlp")


@pytest.mark.parametrize("tap", ["attn", "conv"])
def test_gradient_checkpointing_keeps_feature_gradients(tiny_dir, tap):
    sample, t, text, control = _inputs()
    grads = []
    for checkpointing in (False, True):
        unet, controlnet, *_ = load_tiny_components(tiny_dir)
        if checkpointing:
            unet.enable_gradient_checkpointing()
            controlnet.enable_gradient_checkpointing()
        unet.train()
        controlnet.train()
        model = ControlledUNet(unet, controlnet, tap=tap)
        out = model(sample, t, text, control)
        loss = sum(f.float().pow(2).mean() for f in out.features)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in controlnet.parameters() if p.grad is not None]))
        assert all(p.grad is None for p in unet.parameters())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_half_precision_unet_takes_fp32_controlnet_residuals(tiny_dir):
    """Mixed precision as train.py sets it up: frozen UNet in bf16, ControlNet prepared by accelerate (fp32 weights,
    autocast forward, outputs converted to fp32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    unet, controlnet, *_ = load_tiny_components(tiny_dir)
    unet.requires_grad_(False).to(torch.bfloat16)
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(controlnet)
        model = ControlledUNet(unet, prepared, tap="attn")
        sample, t, text, control = _inputs()
        out = model(sample.bfloat16(), t, text.bfloat16(), control.bfloat16())
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert out.noise_pred.dtype == torch.bfloat16 and torch.isfinite(out.noise_pred.float()).all()
    assert len(out.features) == 9 and all(f.dtype == torch.bfloat16 for f in out.features)
    out.noise_pred.float().pow(2).mean().backward()
    grads = [p.grad for p in controlnet.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_step_index_probe_reads_the_embedding_of_999_minus_t(tiny_dir):
    """A Readout Guidance head (probe.timestep_input=step_index) gets the UNet's embedding of 999 - t; the UNet's own
    forward still runs at t (same prediction)."""
    unet, controlnet, *_ = load_tiny_components(tiny_dir)
    sample, t, text, control = _inputs()
    with torch.no_grad():
        real = ControlledUNet(unet, controlnet, tap="attn")(sample, t, text, control)
        mirrored = ControlledUNet(unet, controlnet, tap="attn", probe_timesteps=lambda ts: 999 - ts)(
            sample, t, text, control
        )
        expected = unet.time_embedding(unet.time_proj(999 - t))
        at_t = unet.time_embedding(unet.time_proj(t))
    torch.testing.assert_close(real.time_embedding, at_t)
    torch.testing.assert_close(mirrored.time_embedding, expected)
    assert not torch.allclose(mirrored.time_embedding, real.time_embedding)
    torch.testing.assert_close(mirrored.noise_pred, real.noise_pred)
