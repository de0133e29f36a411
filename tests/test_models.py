import shutil

import pytest

from innercontrol.config import load_config
from innercontrol.hub import ModelFolderError
from innercontrol.models import controlnet_folder, load_controlnet, load_stable_diffusion


def model_config(pretrained, controlnet=None):
    overrides = [f"model.pretrained_model={pretrained}", f"model.controlnet={controlnet or 'null'}"]
    return load_config(None, overrides).model


def test_empty_pretrained_folder_names_folder_and_layout(tmp_path):
    (tmp_path / "sd").mkdir()
    with pytest.raises(ModelFolderError, match=r"model.pretrained_model folder '.*sd' is empty: it should hold") as err:
        load_stable_diffusion(model_config(tmp_path / "sd"))
    assert "model_index.json, tokenizer/, text_encoder/, vae/, unet/, scheduler/" in str(err.value)


def test_pretrained_folder_without_tokenizer_lists_what_is_missing(tmp_path, tiny_dir):
    sd = shutil.copytree(tiny_dir, tmp_path / "sd", ignore=shutil.ignore_patterns("tokenizer", "scheduler"))
    with pytest.raises(ModelFolderError, match=r"'.*sd' lacks tokenizer/tokenizer.json .*, scheduler/scheduler_config"):
        load_stable_diffusion(model_config(sd))


def test_tokenizer_that_loads_empty_is_refused(tmp_path, tiny_dir):
    # transformers builds a tokenizer of the 2 special tokens from an empty vocabulary instead of failing
    sd = shutil.copytree(tiny_dir, tmp_path / "sd")
    (sd / "tokenizer" / "tokenizer.json").unlink()
    (sd / "tokenizer" / "vocab.json").write_text("{}")
    (sd / "tokenizer" / "merges.txt").write_text("")
    with pytest.raises(ModelFolderError, match=r"tokenizer in '.*sd/tokenizer' \(model.pretrained_model\) has only 2"):
        load_stable_diffusion(model_config(sd))


def test_empty_controlnet_folder_names_folder_and_contents(tmp_path, tiny_dir):
    (tmp_path / "cn").mkdir()
    cfg = model_config(tiny_dir, tmp_path / "cn")
    with pytest.raises(ModelFolderError, match=r"model.controlnet folder '.*cn' is empty: .*config.json"):
        load_controlnet(cfg, unet=None)
    (tmp_path / "cn" / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match=r"'.*cn' lacks weights \(diffusion_pytorch_model.safetensors\)"):
        load_controlnet(cfg, unet=None)


def test_controlnet_folder_accepts_a_training_output(tiny_dir):
    # an output_dir of python -m innercontrol.train (here: the tiny pipeline's folder) holds the model in controlnet/
    assert controlnet_folder(str(tiny_dir)) == str(tiny_dir / "controlnet")
    assert controlnet_folder(str(tiny_dir / "controlnet")) == str(tiny_dir / "controlnet")


def test_damaged_weights_name_the_part(tmp_path, tiny_dir):
    sd = shutil.copytree(tiny_dir, tmp_path / "sd")
    (sd / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"cannot load AutoencoderKL from '.*sd/vae' \(model.pretrained_model\)"):
        load_stable_diffusion(model_config(sd))


def test_controlnet_from_the_unet_downsamples_the_control_by_the_vae_factor(tiny_dir):
    """A ControlNet initialised from the UNet brings the control image to the latent size of the VAE in use: SD's
    f = 8 layout by default, f = 4 for the miniature's 3-level VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from innercontrol.models import conditioning_channels, vae_scale_factor

    assert conditioning_channels(8) == (16, 32, 96, 256) and conditioning_channels(4) == (16, 32, 96)
    with pytest.raises(ValueError, match="scale factor of 2, 4 or 8, not 6"):
        conditioning_channels(6)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    sd_vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    f4_vae = AutoencoderKL(block_out_channels=(8, 8, 8), norm_num_groups=4, latent_channels=4,
                           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)  # fmt: skip
    assert vae_scale_factor(sd_vae) == 8 and vae_scale_factor(f4_vae) == 4
    cfg = model_config(tiny_dir)
    for vae, side in ((None, 64), (sd_vae, 64), (f4_vae, 32)):
        controlnet = load_controlnet(cfg, unet, vae)
        embedded = controlnet.controlnet_cond_embedding(torch.rand(1, 3, side, side))
        assert embedded.shape[-2:] == (side // (4 if vae is f4_vae else 8),) * 2


def test_text_embedding_cache_matches_the_encoder_and_runs_only_new_captions(tiny_dir):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    from innercontrol.models import TextEmbeddingCache, encode_prompts

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder").eval()
    rows = []
    real_forward = encoder.forward

    def counting(input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return real_forward(input_ids, *args, **kwargs)

    encoder.forward = counting
    from innercontrol.families import PromptEmbeddings

    cache = TextEmbeddingCache(
        lambda captions: PromptEmbeddings(encode_prompts(tokenizer, encoder, captions, "cpu")), max_entries=3
    )
    first = cache(["a red circle", "", "a red circle", "a blue square"]).hidden_states
    assert rows == [3]  # three distinct captions, one encoder call
    with torch.no_grad():
        direct = encode_prompts(tokenizer, encoder, ["a red circle", "", "a red circle", "a blue square"], "cpu")
    torch.testing.assert_close(first, direct, rtol=0, atol=1e-5)
    assert torch.equal(first[0], first[2])

    again = cache(
        ["a blue square", "", "a green triangle"]
    ).hidden_states  # one new caption; the oldest non-empty one goes
    assert rows == [3, 4, 1]  # direct (4 rows) ran in between
    assert (cache.hits, cache.misses) == (1 + 2, 3 + 1)  # a repeat within a batch counts as a hit
    assert list(cache.entries) == ["a blue square", "", "a green triangle"]
    torch.testing.assert_close(again[0], first[3], rtol=0, atol=0)
    cache(["x", "y", "z"])
    assert "" in cache.entries and len(cache.entries) == 3  # the empty caption stays

    with pytest.raises(ValueError, match="max_entries"):
        TextEmbeddingCache(lambda captions: None, max_entries=0)


def test_latent_cache_draws_what_encoding_again_would_and_runs_only_new_rows(tiny_dir):
    """Under one seed the cache returns the latents an uncached encode returns (a fresh sample from the same mean and
    log-variance, with the same random numbers); the encoder runs only for a batch with a new row, on the whole batch;
    the least recently used row goes first."""
    import torch
    from diffusers import AutoencoderKL

    from innercontrol.models import LatentCache

    vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae").eval()
    encoded = []
    vae.encoder.register_forward_hook(lambda module, args, output: encoded.append(len(args[0])))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def uncached(batch, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor

    cache = LatentCache(vae, max_entries=3)
    torch.manual_seed(1)
    first = cache(images[[0, 1, 0]], ["a", "b", "a"])
    assert encoded == [3]  # new rows: the batch is encoded whole, once
    reference = uncached(images[[0, 1, 0]], 1)
    assert torch.equal(first, reference) and first.stride() == reference.stride()  # the same layout, too
    assert not torch.allclose(first[0], first[2])  # the same row, two samples
    encoded.clear()
    torch.manual_seed(2)
    again = cache(images[[1, 2, 3]], ["b", "c", "d"])  # b cached; c, d new; a (least recently used) goes
    assert encoded == [3]
    reference = uncached(images[[1, 2, 3]], 2)
    assert torch.equal(again, reference) and again.stride() == reference.stride()
    assert list(cache.entries) == ["b", "c", "d"] and (cache.hits, cache.misses) == (1 + 1, 2 + 2)
    encoded.clear()
    torch.manual_seed(3)
    cached = cache(images[[3, 1]], ["d", "b"])  # every row cached: no encoder call
    assert encoded == [] and (cache.hits, cache.misses) == (1 + 1 + 2, 2 + 2)
    torch.testing.assert_close(cached, uncached(images[[3, 1]], 3), rtol=0, atol=1e-5)  # another batch size

    with pytest.raises(ValueError, match="max_entries"):
        LatentCache(vae, max_entries=0)
    with pytest.raises(ValueError, match="2 row ids for 3 images"):
        cache(images[:3], ["a", "b"])
