"""Evaluation metrics, one value per sample: depth RMSE, (MS-)SSIM, edge F1, CLIP score; FID between two folders.

Controllability follows the ControlNet++ protocol (DESIGN section 4 and 6): depth RMSE on the 0-255 scale,
MS-SSIM / SSIM of soft-edge and line-art maps with data_range 1, F1 of binary canny edges.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch

# torchmetrics' (and Wang et al.'s) five scale weights, finest scale first.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
# clean-fid downloads its Inception network to this file when it is missing ("clean" mode, Linux/macOS).
CLEANFID_INCEPTION_FILE = "/tmp/inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B,H,W), (B,1,H,W) or (B,C,H,W) -> (B,H,W) float32 (channel mean)."""
    x = x.float()
    if x.dim() == 4:
        x = x.mean(dim=1)
    if x.dim() != 3:
        raise ValueError(f"expected a (B,H,W) or (B,C,H,W) map, got shape {tuple(x.shape)}")
    return x


def depth_rmse(pred_depth: torch.Tensor, label: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Depth RMSE per sample on the 0-255 scale: prediction / its max vs label min-max scaled (ControlNet++ protocol)."""
    pred, label = _gray(pred_depth), _gray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    pred = pred / pred.amax(dim=(1, 2), keepdim=True).clamp_min(eps) * 255.0
    low = label.amin(dim=(1, 2), keepdim=True)
    high = label.amax(dim=(1, 2), keepdim=True)
    label = (label - low) / (high - low).clamp_min(eps) * 255.0
    return (pred - label).pow(2).mean(dim=(1, 2)).sqrt()


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Single-scale SSIM per sample (gaussian 11x11, sigma 1.5, data_range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    preds, target = preds.float(), target.float()
    return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")


def ms_ssim_scales(height: int, width: int) -> int:
    """Number of MS-SSIM scales an image of this size allows (5 from 176 px up, torchmetrics' size rule)."""
    side = min(height, width)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        if side >= 2**scales and side // max(1, scales - 1) ** 2 > MS_SSIM_KERNEL - 1:
            return scales
    raise ValueError(f"images of {height}x{width} are too small for MS-SSIM")


def ms_ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per sample (data_range 1, torchmetrics defaults).

    Images of at least 176 px use the standard five scales. Smaller ones (e.g. the tiny 128 px pipeline) drop
    the coarsest scales that do not fit and renormalise the remaining weights to sum to one: such numbers are
    for tests only and not comparable with published ones.
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    preds, target = preds.float(), target.float()
    scales = ms_ssim_scales(preds.shape[-2], preds.shape[-1])
    betas = MS_SSIM_BETAS
    if scales < len(MS_SSIM_BETAS):
        kept = MS_SSIM_BETAS[:scales]
        betas = tuple(float(b / sum(kept)) for b in kept)
    return multiscale_structural_similarity_index_measure(
        preds, target, data_range=1.0, betas=betas, kernel_size=MS_SSIM_KERNEL, reduction="none"
    )


def published_lineart_map(control: torch.Tensor) -> torch.Tensor:
    """A white-line map in [0,1] as the published line-art evaluation sees it (DESIGN 7): the dark-line drawing
    1 - control rounded to uint8, inverted in uint8 arithmetic, where 1 - x wraps (0 -> 1, 1 -> 0, v -> 257 - v),
    then divided by 255. Every value but the darkest two moves by 2/255; pure-black lines become ~0."""
    drawing = ((1.0 - control.float()).clamp(0, 1) * 255).round().to(torch.int64)
    return ((1 - drawing) % 256).float() / 255.0


def edge_f1(pred_binary: torch.Tensor, label_binary: torch.Tensor, zero_division: float = 0.0) -> torch.Tensor:
    """F1 of binary edge maps per sample, 2TP / (2TP + FP + FN); `zero_division` when both maps are empty."""
    pred = pred_binary.reshape(pred_binary.shape[0], -1) > 0.5
    label = label_binary.reshape(label_binary.shape[0], -1) > 0.5
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred_binary.shape)} and label {tuple(label_binary.shape)} differ")
    true_pos = (pred & label).sum(dim=1).double()
    false_pos = (pred & ~label).sum(dim=1).double()
    false_neg = (~pred & label).sum(dim=1).double()
    denom = 2 * true_pos + false_pos + false_neg
    f1 = torch.where(denom > 0, 2 * true_pos / denom.clamp_min(1), torch.full_like(denom, zero_division))
    return f1.float()


def _as_pil_list(images) -> list:
    from PIL import Image

    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            images = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]
    return list(images)


def _embeddings(output) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, transformers 5 an output object holding it.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(images, captions: Sequence[str], model, processor, batch_size: int = 64) -> torch.Tensor:
    """CLIP score per image: 100 x cosine(image embedding, caption embedding), clamped at 0 (as torchmetrics).

    images: list of PIL images or a (B,3,H,W) tensor (uint8, or float in [0,1]); model: transformers CLIPModel.
    """
    images = _as_pil_list(images)
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    param = next(model.parameters())
    max_length = model.config.text_config.max_position_embeddings
    scores = []
    for start in range(0, len(images), batch_size):
        inputs = processor(
            text=list(captions[start : start + batch_size]),
            images=images[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        pixel_values = inputs["pixel_values"].to(param.device, param.dtype)
        image_emb = _embeddings(model.get_image_features(pixel_values=pixel_values)).float()
        text_emb = _embeddings(
            model.get_text_features(
                input_ids=inputs["input_ids"].to(param.device), attention_mask=inputs["attention_mask"].to(param.device)
            )
        ).float()
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        scores.append((100.0 * cosine).clamp_min(0.0).cpu())
    return torch.cat(scores)


def inception_feature_extractor(weights: str, device: str | torch.device = "cpu") -> Callable:
    """clean-fid's Inception ("clean" mode) built from a local copy of inception-2015-12-05.pt (offline machines)."""
    from cleanfid.inception_torchscript import InceptionV3W

    weights = Path(weights).expanduser().resolve()
    if not weights.is_file():
        raise FileNotFoundError(
            f"Inception weights '{weights}' do not exist; download {INCEPTION_URL} where the network is reachable "
            "and pass eval.inception_weights=FILE"
        )
    # InceptionV3W reads <folder>/inception-2015-12-05.pt: give it a folder with that name pointing at our file.
    with tempfile.TemporaryDirectory() as folder:
        os.symlink(weights, os.path.join(folder, "inception-2015-12-05.pt"))
        model = InceptionV3W(folder, download=False, resize_inside=False).to(device).eval()
    return lambda batch: model(batch)


def frechet_distance(features_a, features_b, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two (N, D) feature sets (numpy, float64)."""
    import numpy as np
    from scipy import linalg

    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product (fewer images than dimensions): regularise the diagonal
        offset = np.eye(cov_a.shape[0]) * eps
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    # Rounding leaves a tiny imaginary part on a matrix whose exact root is real.
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def clip_feature_extractor(folder: str, device: str | torch.device = "cpu") -> Callable:
    """FID features from a CLIPModel's image embeddings: (B,3,299,299) in [0,255] (clean-fid's input) -> (B,D).

    The images are resized to the model's input size and normalised with its processor's mean and std."""
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).to(device).eval()
    processor = CLIPImageProcessor.from_pretrained(folder)
    size = model.config.vision_config.image_size
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(batch: torch.Tensor) -> torch.Tensor:
        pixels = torch.nn.functional.interpolate(
            batch.to(device).float() / 255.0, size=(size, size), mode="bicubic", antialias=True, align_corners=False
        )
        return _embeddings(model.get_image_features(pixel_values=(pixels - mean) / std)).float()

    return features


def fid(
    real_dir: str | os.PathLike,
    fake_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    batch_size: int = 32,
    inception_weights: Optional[str] = None,
    feature_extractor: Optional[Callable] = None,
    verbose: bool = False,
) -> float:
    """FID between two image folders with clean-fid's features ("clean" mode: PIL bicubic resize to 299, Inception).

    inception_weights: a local inception-2015-12-05.pt (else clean-fid reads, or downloads to, /tmp/);
    feature_extractor: any function (B,3,299,299) in [0,255] -> (B,D) features, replacing Inception (tests).
    The distance itself is ours: clean-fid 0.1.35's passes `disp` to scipy's sqrtm, which newer scipy refuses.
    """
    from cleanfid.features import build_feature_extractor
    from cleanfid.fid import get_folder_features

    device = torch.device(device)
    if feature_extractor is None and inception_weights is not None:
        feature_extractor = inception_feature_extractor(inception_weights, device)
    if feature_extractor is None:
        try:
            feature_extractor = build_feature_extractor("clean", device, use_dataparallel=False)
        except OSError as err:  # urllib's URLError is an OSError: the Inception download failed
            raise RuntimeError(
                f"clean-fid could not download its Inception weights ({err}); download {INCEPTION_URL} where the "
                f"network is reachable and pass eval.inception_weights=FILE or copy it to {CLEANFID_INCEPTION_FILE}"
            ) from None
    features = [
        get_folder_features(
            str(folder),
            feature_extractor,
            num_workers=num_workers,
            batch_size=batch_size,
            device=device,
            mode="clean",
            verbose=verbose,
        )
        for folder in (real_dir, fake_dir)
    ]
    return frechet_distance(*features)
