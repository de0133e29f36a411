"""Base-model families (issue 17): SDXL prompt conditioning, decoder taps, training, probe pretraining and the probe
readout on the tiny SDXL pipeline (python -m innercontrol.tiny --family sdxl), with the SD1.5 paths unchanged."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from innercontrol.controlled_unet import ControlledUNet, tap_decoder_features, tapped_channels
from innercontrol.families import NO_CONTROLNET, SD15, SDXL, PromptEmbeddings, family_of
from innercontrol.models import load_stable_diffusion

ROOT = Path(__file__).resolve().parents[1]
RES = 64


def model_config(folder, **extra):
    return OmegaConf.create({"pretrained_model": str(folder), "revision": None, "variant": None, **extra})


def test_family_is_read_from_model_index(tiny_dir, tiny_sdxl_dir):
    assert family_of(str(tiny_dir)) is SD15 and family_of(str(tiny_sdxl_dir)) is SDXL
    sd = load_stable_diffusion(model_config(tiny_sdxl_dir))
    assert sd.family is SDXL and type(sd.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert set(sd.components()) == {"vae", "unet", "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"}
    sd15 = load_stable_diffusion(model_config(tiny_dir))
    assert sd15.family is SD15 and sd15.text_encoder_2 is None
    assert set(sd15.components()) == {"vae", "unet", "tokenizer", "text_encoder"}


def test_each_family_names_a_pipeline_for_every_evaluated_model_kind():
    import diffusers

    from innercontrol.config import RANGES

    for family, xl in ((SD15, ""), (SDXL, "XL")):
        assert all(RANGES["eval.model_kind"].accepts(kind) for kind in set(family.pipelines) - {NO_CONTROLNET})
        assert family.pipelines == {
            NO_CONTROLNET: f"StableDiffusion{xl}Pipeline",
            "controlnet": f"StableDiffusion{xl}ControlNetPipeline",
            "t2i_adapter": f"StableDiffusion{xl}AdapterPipeline",
        }
        assert all(hasattr(diffusers, name) for name in family.pipelines.values())
        assert family.controlnet_pipeline == family.pipelines["controlnet"]


def test_sdxl_folder_without_its_second_text_encoder_names_what_is_missing(tiny_sdxl_dir, tmp_path):
    import shutil

    from innercontrol.hub import ModelFolderError

    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="text_encoder_2/config.json"):
        load_stable_diffusion(model_config(broken))


def test_sdxl_text_encoder_2_that_does_not_fit_the_unet_is_named(tiny_sdxl_dir, tmp_path):
    """The UNet's added-conditioning input (6 size ids x 8 + pooled 32 in the tiny SDXL) must match text_encoder_2's
    projection: another encoder is refused at load time, not with a shape error deep in the ControlNet."""
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from innercontrol.hub import ModelFolderError

    mixed = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, mixed)
    config = CLIPTextConfig.from_pretrained(mixed / "text_encoder_2")
    config.projection_dim = 16
    shutil.rmtree(mixed / "text_encoder_2")
    CLIPTextModelWithProjection(config).save_pretrained(mixed / "text_encoder_2")
    with pytest.raises(
        ModelFolderError, match=r"takes 80 numbers but 6 size ids x 8 \+ text_encoder_2's projection 16"
    ):
        load_stable_diffusion(model_config(mixed))


def test_sdxl_prompt_embeddings_equal_the_sdxl_pipeline(tiny_sdxl_dir):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    sd = load_stable_diffusion(model_config(tiny_sdxl_dir))
    captions = ["a red circle", "", "a blue square in front of a green cube"]
    prompt = sd.encode_prompts(captions, "cpu", (96, 64))
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_sdxl_dir, controlnet=ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet")
    )
    embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(prompt.hidden_states, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(prompt.added_cond_kwargs["text_embeds"], pooled, rtol=0, atol=1e-6)
    # (original H, W, crop top, left, target H, W): the SDXL pipelines' default for a 96 x 64 image
    assert prompt.added_cond_kwargs["time_ids"].tolist() == [[96, 64, 0, 0, 96, 64]] * 3
    assert prompt.hidden_states.shape == (3, 77, 64)  # two 32-wide encoders, concatenated


def test_sd15_prompt_embeddings_are_the_text_encoder_states(tiny_dir):
    from innercontrol.models import encode_prompts

    sd = load_stable_diffusion(model_config(tiny_dir))
    prompt = sd.encode_prompts(["a red circle"], "cpu", (64, 64))
    assert prompt.added_cond_kwargs == {}
    assert torch.equal(prompt.hidden_states, encode_prompts(sd.tokenizer, sd.text_encoder, ["a red circle"], "cpu"))


def test_text_embedding_cache_keeps_sdxl_added_conditioning(tiny_sdxl_dir):
    from innercontrol.models import TextEmbeddingCache

    sd = load_stable_diffusion(model_config(tiny_sdxl_dir))
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return sd.encode_prompts(captions, "cpu", (RES, RES))

    cache = TextEmbeddingCache(encode, max_entries=8)
    cached = cache(["a", "b", "a"])
    again = cache(["b", "c"])
    assert calls == [["a", "b"], ["c"]]
    direct = sd.encode_prompts(["a", "b", "a"], "cpu", (RES, RES))
    torch.testing.assert_close(cached.hidden_states, direct.hidden_states, rtol=0, atol=1e-6)
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(cached.added_cond_kwargs[key], direct.added_cond_kwargs[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(again.added_cond_kwargs[key][0], cached.added_cond_kwargs[key][1])


def test_sdxl_decoder_taps_real_architecture_and_tiny():
    """SDXL's decoder (real widths, built on the meta device): 6 attention taps (the two CrossAttn up blocks, 3 each)
    and 9 ResNet taps; the tiny SDXL UNet has the same layout at widths 64 / 32 / 16."""
    from diffusers import UNet2DConditionModel

    from innercontrol.tiny import SDXL_BASE_UNET_CONFIG, SDXL_UNET_CONFIG

    with torch.device("meta"):
        real = UNet2DConditionModel(**SDXL_BASE_UNET_CONFIG)
    assert tapped_channels(real, "attn") == [1280] * 3 + [640] * 3
    assert tapped_channels(real, "conv") == [1280] * 3 + [640] * 3 + [320] * 3
    assert [len(b.attentions[0].transformer_blocks) for b in real.up_blocks[:2]] == [10, 2]  # deeper, fewer blocks
    assert sum(p.numel() for p in real.parameters()) == pytest.approx(2.567e9, rel=0.01)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    prompt = PromptEmbeddings(
        torch.randn(2, 7, 64),
        {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[RES, RES, 0, 0, RES, RES]] * 2)},
    )
    sample = torch.randn(2, 4, RES // 8, RES // 8)
    for tap, channels, sizes in [
        ("attn", [64] * 3 + [32] * 3, [2] * 3 + [4] * 3),
        ("conv", [64] * 3 + [32] * 3 + [16] * 3, [2] * 3 + [4] * 3 + [8] * 3),
    ]:
        with torch.no_grad(), tap_decoder_features(unet, tap) as features:
            unet(sample, torch.tensor([10, 900]), prompt.hidden_states, added_cond_kwargs=prompt.added_cond_kwargs)
        assert tapped_channels(unet, tap) == channels
        assert [f.shape[1] for f in features] == channels and [f.shape[-1] for f in features] == sizes


def test_controlled_unet_passes_sdxl_added_conditioning(tiny_sdxl_dir):
    """ControlledUNet with the family's PromptEmbeddings = the ControlNet and UNet called by hand with the pooled
    embedding and size ids; other size ids give another prediction (they reach the UNet)."""
    from diffusers import ControlNetModel

    sd = load_stable_diffusion(model_config(tiny_sdxl_dir))
    controlnet = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet").eval()
    model = ControlledUNet(sd.unet, controlnet, tap="attn")
    prompt = sd.encode_prompts(["a red circle", "a blue square"], "cpu", (RES, RES))
    torch.manual_seed(0)
    noisy, control, t = torch.randn(2, 4, 8, 8), torch.rand(2, 3, RES, RES), torch.tensor([100, 800])
    with torch.no_grad():
        out = model(noisy, t, prompt, control)
        kwargs = dict(encoder_hidden_states=prompt.hidden_states, added_cond_kwargs=prompt.added_cond_kwargs)
        down, mid = controlnet(noisy, t, controlnet_cond=control, return_dict=False, **kwargs)
        direct = sd.unet(
            noisy, t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kwargs
        ).sample
        other = PromptEmbeddings(
            prompt.hidden_states, {**prompt.added_cond_kwargs, "time_ids": prompt.added_cond_kwargs["time_ids"] * 4}
        )
        moved = model(noisy, t, other, control).noise_pred
    torch.testing.assert_close(out.noise_pred, direct, rtol=0, atol=1e-6)
    assert len(out.features) == 6 and (moved - out.noise_pred).abs().max() > 1e-4


def test_sdxl_gradient_contract_only_controlnet_learns(tiny_sdxl_dir):
    """Reward + alignment on the tiny SDXL models: every frozen part (UNet, VAE, both text encoders, probe, condition
    model) gets no gradient and does not change; the ControlNet does."""
    from diffusers import ControlNetModel

    from innercontrol.losses import LossWeights, diffusion_target, innercontrol_objective
    from innercontrol.probes import build_probe

    from .helpers import frozen_conv_condition

    sd = load_stable_diffusion(model_config(tiny_sdxl_dir))
    controlnet = ControlNetModel.from_pretrained(tiny_sdxl_dir / "controlnet").train()
    torch.manual_seed(0)
    probe = build_probe(tapped_channels(sd.unet, "attn"), 32, 64).requires_grad_(False).eval()
    condition = frozen_conv_condition()
    frozen = {"unet": sd.unet, "vae": sd.vae, "text_encoder": sd.text_encoder, "text_encoder_2": sd.text_encoder_2}
    frozen.update(probe=probe, condition=condition.model)
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in frozen.items()}
    start = {k: v.clone() for k, v in controlnet.state_dict().items()}
    model = ControlledUNet(sd.unet, controlnet, "attn")
    images, control = torch.rand(2, 3, RES, RES) * 2 - 1, torch.rand(2, 3, RES, RES)
    with torch.no_grad():
        latents = sd.vae.encode(images).latent_dist.sample() * sd.vae.config.scaling_factor
    noise, timesteps = torch.randn_like(latents), torch.tensor([120, 600])
    noisy = sd.scheduler.add_noise(latents, noise, timesteps)
    prompt = sd.encode_prompts(["a red circle", "a blue square"], "cpu", (RES, RES))
    out = model(noisy, timesteps, prompt, control)
    weights = LossWeights(0.5, (0, 400), 1.0, (0, 920))
    target = diffusion_target(sd.scheduler, latents, noise, timesteps)
    args = (weights, sd.scheduler, sd.vae, condition, probe, None, timesteps)
    terms = innercontrol_objective(out, target, noisy, timesteps, control, *args)
    assert terms["reward_samples"].item() == 1 and terms["alignment_samples"].item() == 2
    torch.testing.assert_close(terms["loss"], terms["diffusion"] + 0.5 * terms["reward"] + terms["alignment"])
    terms["loss"].backward()
    for name, module in frozen.items():
        assert all(p.grad is None for p in module.parameters()), f"{name} received a gradient"
    assert all(p.grad is not None for p in controlnet.parameters() if p.requires_grad)
    # the added-conditioning embedding of the ControlNet learns too (the pooled text and size ids reach it)
    assert controlnet.add_embedding.linear_1.weight.grad.abs().sum() > 0
    torch.optim.AdamW(controlnet.parameters(), lr=1e-3).step()
    for name, module in frozen.items():
        assert all(torch.equal(before[name][k], v) for k, v in module.state_dict().items()), f"{name} changed"
    assert any(not torch.equal(start[k], v) for k, v in controlnet.state_dict().items())


@pytest.fixture(scope="module")
def sdxl_ws(tiny_sdxl_dir, tmp_path_factory):
    from innercontrol.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("sdxl_ws")
    write_synthetic(root / "synthetic", num=24, resolution=RES, seed=0, val_fraction=0.25)
    return {"sdxl": tiny_sdxl_dir, "data": root / "synthetic", "root": root}


def common_overrides(ws):
    return [
        f"model.pretrained_model={ws['sdxl']}",
        f"condition.reward_model={ws['sdxl']}/dpt",
        f"condition.eval_model={ws['sdxl']}/dpt",
        f"data.dataset={ws['data']}",
        f"data.resolution={RES}",
        f"eval.dataset={ws['data']}",
        f"eval.resolution={RES}",
        "model.tap=attn",
    ]


def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def sdxl_probe(sdxl_ws):
    """Probe pretraining on the tiny SDXL UNet's 6 attention taps (12 steps)."""
    import innercontrol.train_probes as train_probes

    fresh_accelerate()
    probe_dir = sdxl_ws["root"] / "probe"
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *common_overrides(sdxl_ws)]
    args += [f"probe.path={probe_dir}", f"probe.output_dir={sdxl_ws['root'] / 'probe_run'}", "probe.max_steps=12"]
    args += ["probe.batch_size=4", "probe.eval_samples=6", "logging.checkpoint_every=6"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_probes, "TIE_SE", 1e9)  # 12 steps: accept the probe whatever its margin (test_train_probes)
        train_probes.main(args)
    return probe_dir


def test_sdxl_probe_pretraining_reads_the_sdxl_taps(sdxl_probe):
    from innercontrol.probes import load_probe

    probe = load_probe(sdxl_probe)
    assert list(probe.config.feature_dims) == [64] * 3 + [32] * 3 and probe.config.tap == "attn"
    assert probe.config.timestep_embedding_dim == 64  # 4 x the tiny SDXL base width
    rows = json.loads((sdxl_probe / "probe_accuracy.json").read_text())
    assert len(rows) == 10 and all(r["probe_mse"] > 0 and r["mean_map_mse"] > 0 for r in rows)


def test_sdxl_training_with_reward_and_alignment_changes_only_the_controlnet(sdxl_ws, sdxl_probe, monkeypatch):
    """train.main on the tiny SDXL pipeline (reward + alignment, validation grid through the SDXL ControlNet pipeline):
    the saved ControlNet moved; UNet, VAE and both text encoders are bit-identical to the files after the run."""
    from diffusers import ControlNetModel

    from innercontrol import models, train

    loaded = []
    real_load = models.load_stable_diffusion

    def remember(cfg):
        loaded.append(real_load(cfg))
        return loaded[-1]

    monkeypatch.setattr(train, "load_stable_diffusion", remember)
    out = sdxl_ws["root"] / "train"
    fresh_accelerate()
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *common_overrides(sdxl_ws)]
    args += [f"model.controlnet={sdxl_ws['sdxl']}/controlnet", f"probe.path={sdxl_probe}", f"logging.output_dir={out}"]
    args += ["optim.max_steps=3", "optim.batch_size=2", "logging.checkpoint_every=2", "logging.validation_every=3"]
    args += ["logging.report_to=none", "loss.reward_window=[0,999]", "optim.text_embedding_cache=16"]
    train.main(args)

    sd = loaded[0]
    assert sd.family is SDXL
    reference = real_load(model_config(sdxl_ws["sdxl"]))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        now, then = getattr(sd, part).state_dict(), getattr(reference, part).state_dict()
        assert all(torch.equal(now[k], then[k]) for k in then), f"{part} changed"
    start = ControlNetModel.from_pretrained(sdxl_ws["sdxl"] / "controlnet").state_dict()
    trained = ControlNetModel.from_pretrained(out / "controlnet")
    moved = [k for k, v in trained.state_dict().items() if not torch.equal(start[k], v)]
    assert any(k.startswith("add_embedding") for k in moved) and any(
        k.startswith("controlnet_down_blocks") for k in moved
    )
    assert (out / "validation" / "step-000003.png").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_sdxl_controlnet_from_unet_and_fp16_vae_rule(sdxl_ws, tmp_path):
    """model.controlnet=null makes an SDXL ControlNet from the UNet (added conditioning copied); fp16 with SDXL's own
    VAE is refused with the fix named, by training and probe pretraining, before either writes anything; a VAE whose
    config says it is fp16-safe (force_upcast false, as the fp16-fix VAE) passes the check."""
    from diffusers import AutoencoderKL

    from innercontrol import train, train_probes
    from innercontrol.config import ConfigError, load_config
    from innercontrol.models import check_vae_precision, load_controlnet

    sd = load_stable_diffusion(model_config(sdxl_ws["sdxl"]))
    controlnet = load_controlnet(OmegaConf.create({"controlnet": None}), sd.unet, sd.vae)
    assert controlnet.config.addition_embed_type == "text_time"
    assert torch.equal(controlnet.add_embedding.linear_1.weight, sd.unet.add_embedding.linear_1.weight)
    fresh_accelerate()
    cfg = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        [*common_overrides(sdxl_ws), "optim.mixed_precision=fp16", f"logging.output_dir={tmp_path / 'fp16'}"],
    )
    with pytest.raises(ConfigError, match="madebyollin/sdxl-vae-fp16-fix"):
        train.train(cfg)
    fresh_accelerate()
    probe_args = ["--config", str(ROOT / "configs" / "tiny.yaml"), *common_overrides(sdxl_ws)]
    probe_args += ["optim.mixed_precision=fp16", f"probe.path={tmp_path / 'p'}", f"probe.output_dir={tmp_path / 'pr'}"]
    with pytest.raises(ConfigError, match="model.vae=madebyollin/sdxl-vae-fp16-fix or optim.mixed_precision=bf16"):
        train_probes.main(probe_args)
    assert not (tmp_path / "fp16").exists() and not (tmp_path / "pr").exists()
    AutoencoderKL.from_pretrained(sdxl_ws["sdxl"] / "vae", force_upcast=False).save_pretrained(tmp_path / "fix")
    check_vae_precision(model_config(sdxl_ws["sdxl"], vae=str(tmp_path / "fix")), "fp16")  # no error
    check_vae_precision(model_config(sdxl_ws["sdxl"]), "bf16")


def test_sdxl_probe_readout_during_sampling(sdxl_ws, sdxl_probe, tmp_path):
    from accelerate import Accelerator

    import innercontrol.evaluate as ev
    from innercontrol.config import load_config

    cfg = load_config(
        str(ROOT / "configs" / "tiny.yaml"),
        [*common_overrides(sdxl_ws), f"eval.output_dir={tmp_path / 'readout'}", "eval.num_inference_steps=3"],
    )
    table = ev.probe_readout(cfg, str(sdxl_ws["sdxl"] / "controlnet"), str(sdxl_probe), 3, Accelerator(cpu=True))
    assert [row["step"] for row in table] == [0, 1, 2]
    assert all(row["probe_mse"] > 0 and row["mean_map_mse"] > 0 for row in table)


def test_model_vae_replaces_the_base_models_vae(tiny_sdxl_dir, tmp_path):
    """model.vae (e.g. madebyollin/sdxl-vae-fp16-fix) is the VAE the training step encodes and the reward decodes
    with."""
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.5)
    other.save_pretrained(tmp_path / "fp16_fix")
    sd = load_stable_diffusion(model_config(tiny_sdxl_dir, vae=str(tmp_path / "fp16_fix")))
    base = load_stable_diffusion(model_config(tiny_sdxl_dir))
    weights, replaced, own = (m.state_dict() for m in (other, sd.vae, base.vae))
    assert all(torch.equal(weights[k], replaced[k]) for k in weights)
    assert not all(torch.equal(own[k], replaced[k]) for k in own)
