import json

import torch

from innercontrol.tiny import build_tiny_pipeline, tiny_tokenizer


def test_tokenizer_is_real_and_round_trips():
    tok = tiny_tokenizer()
    assert len(tok) > 2
    assert tok.model_max_length == 77
    prompt = "a red circle in front of a blue square, 3 zebras!"
    ids = tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",").replace(" !", "!") == prompt
    assert len(tok(prompt, padding="max_length").input_ids) == 77


def test_tiny_folder_has_hub_layout_and_generates(tiny_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

    for sub in ("unet", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler", "clip"):
        assert (tiny_dir / sub).is_dir(), sub
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    # Loaded the way a hub id is loaded, component by component.
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    assert list(unet.config.up_block_types[1:]) == ["CrossAttnUpBlock2D"] * 3
    ControlNetModel.from_pretrained(tiny_dir / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_dir)
    assert len(pipe.tokenizer) > 2
    out = pipe(
        "a red circle",
        image=torch.rand(1, 3, 128, 128),
        num_inference_steps=2,
        height=128,
        width=128,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 128, 128, 3)
    assert 0.0 <= out.min() and out.max() <= 1.0 and out.std() > 0


def test_tiny_is_deterministic():
    a = build_tiny_pipeline()
    b = build_tiny_pipeline()
    for name in ("unet", "controlnet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_tiny_clip_loads(tiny_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_dir / "clip")
    proc = CLIPProcessor.from_pretrained(tiny_dir / "clip")
    batch = proc(
        text=["a red circle"], images=[torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8)], return_tensors="pt"
    )
    out = model(**batch)
    assert out.logits_per_image.shape == (1, 1)
