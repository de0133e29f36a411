import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from innercontrol import metrics


def smooth_images(batch, size, seed):
    """Random images with spatial structure (blurred noise) in [0,1], so SSIM values are far from 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size // 8, size // 8, generator=gen)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def numpy_depth_rmse(pred, label):
    out = []
    for p, q in zip(pred, label):
        p = p.mean(axis=0)
        q = q.mean(axis=0)
        p = p / p.max() * 255
        q = (q - q.min()) / (q.max() - q.min()) * 255
        out.append(np.sqrt(np.mean((p - q) ** 2)))
    return np.array(out)


def test_depth_rmse_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(5, 3, 24, 20, generator=gen) * 7.0 + 0.1
    label = torch.rand(5, 3, 24, 20, generator=gen) * 0.6 + 0.2
    ours = metrics.depth_rmse(pred, label)
    assert ours.shape == (5,)
    np.testing.assert_allclose(ours.numpy(), numpy_depth_rmse(pred.double().numpy(), label.double().numpy()), rtol=1e-5)
    # The protocol is scale-free for both maps: the same structure at another scale scores 0.
    ramp = torch.linspace(0.0, 1.0, 32).view(1, 1, 1, 32).expand(2, 1, 16, 32)
    assert metrics.depth_rmse(ramp * 3.0, ramp * 0.5 + 0.25).abs().max() < 1e-3
    # 1-channel and (B,H,W) inputs are accepted.
    assert torch.allclose(metrics.depth_rmse(pred[:, :1], label[:, 0]), metrics.depth_rmse(pred[:, :1], label[:, :1]))


def test_ms_ssim_per_sample_matches_torchmetrics_class():
    from torchmetrics.image import MultiScaleStructuralSimilarityIndexMeasure

    target = smooth_images(3, 192, seed=1)
    noise = smooth_images(3, 192, seed=2)
    preds = (0.7 * target + 0.3 * noise).clamp(0, 1)
    ours = metrics.ms_ssim(preds, target)
    assert ours.shape == (3,)
    assert 0.2 < ours.min() and ours.max() < 0.999
    for i in range(3):
        reference = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)
        reference.update(preds[i : i + 1], target[i : i + 1])
        assert ours[i].item() == pytest.approx(reference.compute().item(), abs=1e-5)
    whole = MultiScaleStructuralSimilarityIndexMeasure(data_range=1.0)
    whole.update(preds, target)
    assert ours.mean().item() == pytest.approx(whole.compute().item(), abs=1e-5)


def test_ssim_per_sample_matches_torchmetrics_class():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    target = smooth_images(2, 64, seed=3)
    preds = (target + 0.1 * torch.rand(target.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    ours = metrics.ssim(preds, target)
    for i in range(2):
        reference = StructuralSimilarityIndexMeasure(data_range=1.0)
        reference.update(preds[i : i + 1], target[i : i + 1])
        assert ours[i].item() == pytest.approx(reference.compute().item(), abs=1e-5)


def test_ms_ssim_small_images_use_fewer_scales():
    assert metrics.ms_ssim_scales(512, 512) == 5
    assert metrics.ms_ssim_scales(176, 176) == 5
    assert metrics.ms_ssim_scales(175, 175) == 4
    assert metrics.ms_ssim_scales(128, 128) == 4
    target = smooth_images(2, 128, seed=5)
    assert torch.allclose(metrics.ms_ssim(target, target), torch.ones(2), atol=1e-5)
    preds = (0.6 * target + 0.4 * smooth_images(2, 128, seed=6)).clamp(0, 1)
    assert (metrics.ms_ssim(preds, target) < 0.99).all()


def test_edge_f1_hand_counted():
    pred = torch.zeros(3, 1, 4, 4)
    label = torch.zeros(3, 1, 4, 4)
    # sample 0: 3 predicted edges, 4 true edges, 2 in common -> TP 2, FP 1, FN 2 -> F1 = 4 / 7
    pred[0, 0, 0, :3] = 1
    label[0, 0, 0, 1:3] = 1
    label[0, 0, 1, :2] = 1
    # sample 1: identical maps -> 1; sample 2: both empty -> zero_division
    pred[1, 0, 2, 2] = label[1, 0, 2, 2] = 1
    f1 = metrics.edge_f1(pred, label)
    assert f1.tolist() == pytest.approx([4 / 7, 1.0, 0.0])
    assert metrics.edge_f1(pred, label, zero_division=1.0)[2].item() == 1.0


def test_clip_score_matches_direct_cosine(tiny_dir):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_dir / "clip").eval()
    processor = CLIPProcessor.from_pretrained(tiny_dir / "clip")
    gen = torch.Generator().manual_seed(7)
    images = torch.rand(4, 3, 40, 48, generator=gen)
    captions = ["a red circle", "a blue square on a table", "a cat", "a house in front of a tree"]
    ours = metrics.clip_score(images, captions, model, processor, batch_size=3)
    assert ours.shape == (4,)

    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()) for img in images]
    with torch.no_grad():
        pixels = processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text_emb = model.text_projection(model.text_model(**tokens).pooler_output)
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    expected = (100 * (image_emb * text_emb).sum(-1)).clamp_min(0)
    assert torch.allclose(ours, expected, atol=1e-4)
    # PIL input gives the same scores as the float tensor it came from.
    assert torch.allclose(metrics.clip_score(pil, captions, model, processor), ours, atol=1e-5)


def write_folder(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i}.png")


def colour_statistics(batch):
    """A small offline feature extractor for clean-fid: per-channel mean and std of the 299x299 input."""
    batch = batch.float() / 255.0
    return torch.cat([batch.mean(dim=(2, 3)), batch.std(dim=(2, 3))], dim=1)


def test_fid_offline_with_custom_feature_extractor(tmp_path):
    gen = torch.Generator().manual_seed(8)
    write_folder(tmp_path / "a", torch.rand(12, 3, 32, 32, generator=gen) * 0.5)
    write_folder(tmp_path / "b", torch.rand(12, 3, 32, 32, generator=gen) * 0.5 + 0.5)
    same = metrics.fid(tmp_path / "a", tmp_path / "a", feature_extractor=colour_statistics)
    different = metrics.fid(tmp_path / "a", tmp_path / "b", feature_extractor=colour_statistics)
    assert abs(same) < 1e-6
    assert different > 0.1


def test_frechet_distance_matches_clean_fid_and_closed_form(tmp_path):
    from cleanfid import fid as cleanfid

    rng = np.random.default_rng(9)
    a = rng.normal(size=(40, 6))
    b = rng.normal(size=(50, 6)) * 1.5 + 0.3
    ours = metrics.frechet_distance(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    try:
        reference = cleanfid.frechet_distance(mu_a, cov_a, mu_b, cov_b)
    except TypeError:  # clean-fid 0.1.35 passes `disp` to scipy's sqrtm, which newer scipy refuses
        reference = None
    if reference is not None:
        assert ours == pytest.approx(reference, rel=1e-6)
    # One dimension: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2.
    x, y = rng.normal(size=(30, 1)), rng.normal(size=(30, 1)) * 2 + 1
    closed = (x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2
    assert metrics.frechet_distance(x, y) == pytest.approx(closed, rel=1e-6)


class FakeInceptionLayers(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (B, 192)
        return torch.cat([pooled] * 10 + [pooled[:, :128]], dim=1)  # (B, 2048) like Inception's pool3


class FakeInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_local_inception_weights_file_is_used(tmp_path):
    """eval.inception_weights: a local TorchScript file in clean-fid's format, loaded without any download."""
    path = tmp_path / "my_inception.pt"
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    extractor = metrics.inception_feature_extractor(str(path))
    batch = torch.rand(2, 3, 299, 299) * 255
    features = extractor(batch)
    assert features.shape == (2, 2048)
    expected = FakeInceptionLayers()((batch - 128) / 128)
    assert torch.allclose(features, expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        metrics.inception_feature_extractor(str(tmp_path / "missing.pt"))


def test_published_lineart_map_wraps_like_uint8_arithmetic():
    """The published line-art evaluation: dark-line drawing as uint8, `1 - x` in uint8 (wraps), / 255."""
    control = torch.tensor([0.0, 1.0, 254 / 255, 0.5, 100 / 255]).view(1, 1, 1, 5)  # white-line values
    drawing = np.round((1 - control.numpy()) * 255).astype(np.uint8)  # 255, 0, 1, 127 or 128, 155
    expected = (np.uint8(1) - drawing).astype(np.float64) / 255  # numpy's uint8 subtraction wraps
    got = metrics.published_lineart_map(control).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-7)
    # Background (control 0) -> 2/255, the blackest line pixel (control 1) -> 1/255 (~0, where a float inversion
    # gives 1), control 254/255 -> 0, the rest moved by 2/255 from the float value.
    np.testing.assert_allclose(got[0, 0, 0, :3], [2 / 255, 1 / 255, 0.0], atol=1e-7)
    assert abs(got[0, 0, 0, 4] - (100 / 255 + 2 / 255)) < 1e-6
