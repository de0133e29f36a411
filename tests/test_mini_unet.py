"""The miniature's UNet stage on the smoke preset: SD1.5 layout, exact resume, sampling and its CLIP-score report."""

import pytest
import torch

from innercontrol.mini import unet as mini_unet
from innercontrol.mini.scenes import SceneBank


@pytest.fixture(scope="module")
def parts():
    from innercontrol.tiny import build_tiny_clip, build_tiny_pipeline

    pipe = build_tiny_pipeline()
    clip_model, clip_processor = build_tiny_clip()
    bank = SceneBank.render(12, 64, seed=0, progress=False)
    return pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer, clip_model.eval(), clip_processor, bank


def test_unet_has_the_sd15_layout_taps():
    from innercontrol.controlled_unet import tapped_channels

    net = mini_unet.build(mini_unet.PRESETS["cpu"], cross_attention_dim=64, latent_size=16)
    assert tapped_channels(net, "attn") == [128, 128, 128, 64, 64, 64, 32, 32, 32]  # 9 attention taps
    assert len(tapped_channels(net, "conv")) == 12


def test_resumed_training_equals_uninterrupted(parts, tmp_path):
    vae, text_encoder, tokenizer, *_ = parts
    bank = parts[-1]
    preset = dict(mini_unet.PRESETS["smoke"], max_steps=4)
    straight, _ = mini_unet.train(bank, preset, tmp_path / "a", 0, vae, tokenizer, text_encoder, progress=False)
    mini_unet.train(bank, dict(preset, max_steps=2), tmp_path / "b", 0, vae, tokenizer, text_encoder, progress=False)
    resumed, stage = mini_unet.train(bank, preset, tmp_path / "b", 0, vae, tokenizer, text_encoder, progress=False)
    assert stage.step == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # The cached encodings are the VAE's scaled posterior means and the text tower's hidden states.
    cached = torch.load(tmp_path / "a" / "unet" / "encodings.pt", weights_only=True)
    images, _, captions = bank.batch(range(2))
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(cached["latents"][:2], expected)
    assert cached["texts"].shape == (12, 77, text_encoder.config.hidden_size)


def test_caption_dropout_replaces_the_text_with_the_empty_prompt():
    preset = dict(mini_unet.PRESETS["smoke"], batch_size=64, caption_dropout=0.25)
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, noisy, t, encoder_hidden_states, return_dict):
            seen["text"] = encoder_hidden_states
            return (torch.zeros_like(noisy, requires_grad=True),)

    texts = torch.ones(10, 77, 8, dtype=torch.float16)
    empty = torch.zeros(1, 77, 8)
    mini_unet.diffusion_step(
        Recorder(),
        mini_unet.noise_scheduler(),
        torch.randn(10, 4, 8, 8),
        texts,
        empty,
        preset,
        torch.Generator().manual_seed(0),
    )
    dropped = (seen["text"].abs().sum(dim=(1, 2)) == 0).float().mean().item()
    assert 0.1 < dropped < 0.4  # 25% expected of 64


def test_evaluate_reports_the_ratio_of_clip_scores(parts):
    vae, text_encoder, tokenizer, clip_model, clip_processor, bank = parts
    preset = mini_unet.PRESETS["smoke"]
    net = mini_unet.build(preset, text_encoder.config.hidden_size, 8)
    pipe = mini_unet.pipeline(vae, text_encoder, tokenizer, net)
    report, samples = mini_unet.evaluate(pipe, bank, preset, clip_model, clip_processor)
    assert samples.shape == (4, 3, 64, 64) and 0 <= samples.min() and samples.max() <= 1
    assert report["base_clip_score_ratio"] == pytest.approx(
        report["base_clip_score_generated"] / report["base_clip_score_real"]
    )
