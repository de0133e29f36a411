"""CLIP of the miniature: a small transformers CLIPModel trained contrastively on (scene, caption) pairs.

    model = train(train_bank, PRESETS["cpu"], work, seed=0)    # resumable stage work/clip/
    evaluate(model, held_out_bank, PRESETS["cpu"])             # retrieval top-1/top-5, CLIP score own vs shuffled
    save(model, checkpoints/mini/clip)                         # CLIPModel + CLIPProcessor: eval.clip_model=...

Its text tower, with the shipped tokenizer (innercontrol.tiny.tiny_tokenizer), is the pipeline's text encoder
(`text_encoder(model)`); its image tower gives the miniature's FID features (`image_features`).
The loss is CLIP's symmetric InfoNCE with a learnable temperature, except that scenes with the same caption count
as positives of each other: the captions are compositional with few words ("a red circle on a plain background"),
so a batch often holds two scenes with one caption, and plain InfoNCE would push apart a matching pair.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from innercontrol.mini.scenes import SceneBank
from innercontrol.mini.stage import Stage

# Pixel normalisation of OpenAI's CLIP; the saved CLIPImageProcessor uses the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100

PRESETS: dict[str, dict] = {
    # The real recipe: 0.58 s/step measured on the 2-core CPU, so ~13 min of the 2-hour budget (1.8 M parameters).
    # text_width is the UNet's cross_attention_dim.
    "cpu": dict(
        image_size=64,
        patch_size=8,  # 8 x 8 patches, as 128 px at patch 16 (where the 0.58 s/step was measured)
        vision_width=128,
        vision_layers=4,
        text_width=128,
        text_layers=4,
        heads=4,
        projection_dim=64,
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup=100,
        max_steps=1000,
        checkpoint_every=250,
        flip=True,
        retrieval_group=64,
    ),
    # A few seconds, for tests.
    "smoke": dict(
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=1,
        text_width=32,
        text_layers=1,
        heads=2,
        projection_dim=16,
        batch_size=16,
        lr=1e-3,
        weight_decay=0.0,
        warmup=2,
        max_steps=8,
        checkpoint_every=4,
        flip=True,
        retrieval_group=8,
    ),
}


def build(preset: dict, seed: int = 0):
    """A fresh CLIPModel of the preset's sizes; the text config (vocabulary, bos/eos ids) is the tiny pipeline's."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from innercontrol.tiny import tiny_tokenizer

    vocab_size = len(tiny_tokenizer())
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=preset["text_width"],
        intermediate_size=4 * preset["text_width"],
        num_hidden_layers=preset["text_layers"],
        num_attention_heads=preset["heads"],
        max_position_embeddings=77,
        projection_dim=preset["projection_dim"],
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    vision = CLIPVisionConfig(
        hidden_size=preset["vision_width"],
        intermediate_size=4 * preset["vision_width"],
        num_hidden_layers=preset["vision_layers"],
        num_attention_heads=preset["heads"],
        image_size=preset["image_size"],
        patch_size=preset["patch_size"],
        projection_dim=preset["projection_dim"],
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=preset["projection_dim"]
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def processor_for(model):
    """The CLIPProcessor that feeds `model` as training did: resize to the vision size, CLIP normalisation."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    from innercontrol.tiny import tiny_tokenizer

    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer())


def pixel_values(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B,3,H,W) images in [0, 1] -> the vision tower's input: resized to `size` (antialiased), CLIP-normalised."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean) / std


def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) image embeddings of (B,3,H,W) images in [0, 1]."""
    param = next(model.parameters())
    pixels = pixel_values(images.to(param.device, param.dtype), model.config.vision_config.image_size)
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def text_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) caption embeddings, pooled at the end-of-text token as CLIP does."""
    output = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
    return model.text_projection(output.pooler_output)


@torch.no_grad()
def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """FID features of the miniature: projected image embeddings (B, projection_dim) of images in [0, 255].

    Takes clean-fid's batches ((B,3,299,299) floats in [0, 255]), so it is a drop-in `feature_extractor`:
        metrics.fid(real_dir, fake_dir, feature_extractor=functools.partial(clip.image_features, model))
    """
    return image_embeddings(model, images.float() / 255.0).float()


def text_encoder(clip_model):
    """The text tower as the pipeline's CLIPTextModel (SD reads its last_hidden_state; the projection is dropped)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip_model.config.text_config)
    # transformers 5 nests a CLIPTextModel in CLIPModel; 4 nests the transformer that CLIPTextModel wraps.
    getattr(encoder, "text_model", encoder).load_state_dict(clip_model.text_model.state_dict())
    return encoder.eval()


class CaptionTokens:
    """Token ids of a bank's captions, tokenised once (the Python tokenizer is slower than a training step)."""

    def __init__(self, captions: list[str]):
        from innercontrol.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
        self.pad_id = tokenizer.pad_token_id
        unique = sorted(set(captions))
        ids = tokenizer(unique, truncation=True, max_length=tokenizer.model_max_length).input_ids
        self.ids = dict(zip(unique, ids))

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) padded to the longest caption, as the CLIPProcessor pads them."""
        rows = [self.ids[caption] for caption in captions]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask


def contrastive_loss(image_emb, text_emb, logit_scale, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE where every pair with the same caption is a positive; returns (loss, image->text top-1)."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image_emb @ text_emb.T
    index = {caption: i for i, caption in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([index[caption] for caption in captions], device=logits.device)
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    accuracy = same.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
    return loss, accuracy


def train(train_bank: SceneBank, preset: dict, work: str | Path, seed: int = 0, progress: bool = True):
    """Train (or resume, or just load when finished) the CLIP stage under work/clip; returns the model in eval mode."""
    model = build(preset, seed)
    tokens = CaptionTokens(train_bank.captions)
    stage = Stage.from_preset("clip", work, model, preset, seed, progress)

    def step(step_index: int, generator: torch.Generator) -> dict:
        indices = torch.randperm(len(train_bank), generator=generator)[: preset["batch_size"]]
        images, _, captions = train_bank.batch(indices)
        images = (images + 1) / 2
        if preset["flip"]:  # captions name no left or right, so a mirrored scene keeps its caption
            flip = torch.rand(len(indices), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        input_ids, attention_mask = tokens(captions)
        loss, accuracy = contrastive_loss(
            image_embeddings(model, images),
            text_embeddings(model, input_ids, attention_mask),
            model.logit_scale,
            captions,
        )
        return {"loss": loss, "batch_top1": accuracy, "logit_scale": model.logit_scale.exp().detach()}

    return stage.run(step)


def retrieval_accuracy(image_emb, text_emb, captions: list[str], group: int, ks=(1, 5)) -> dict[str, float]:
    """Top-k retrieval within consecutive groups of `group` scenes (the last, partial group is dropped).

    `i2t_top{k}`: the scene's own caption is among the k captions nearest to its image (`t2i`: the other way).
    `*_caption` variants also accept another scene of the group with the identical caption text, which no model
    can tell apart (the synthetic captions repeat).
    """
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    group = min(group, len(captions))
    counts: dict[str, float] = {}
    num_groups = len(captions) // group
    for start in range(0, num_groups * group, group):
        similarity = image_emb[start : start + group] @ text_emb[start : start + group].T
        names = captions[start : start + group]
        same = torch.tensor([[a == b for b in names] for a in names])
        for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
            ranked = scores.argsort(dim=1, descending=True)
            for k in ks:
                top = ranked[:, :k]
                own = (top == torch.arange(group)[:, None]).any(dim=1)
                same_caption = same.gather(1, top).any(dim=1)
                for name, hits in ((f"{direction}_top{k}", own), (f"{direction}_top{k}_caption", same_caption)):
                    counts[name] = counts.get(name, 0.0) + float(hits.sum())
    return {name: count / (num_groups * group) for name, count in counts.items()}


def swap_first_colour(caption: str) -> str:
    """The caption with its first (nearest) shape's colour replaced by the next colour of the synthetic palette.

    A hard negative: one word off, as a generated image with one wrong colour would be.
    """
    from innercontrol.synthetic import COLOURS

    palette = list(COLOURS)
    words = caption.split(" ")
    for i, word in enumerate(words):
        if word in COLOURS:
            words[i] = palette[(palette.index(word) + 1) % len(palette)]
            if i > 0 and words[i - 1] in ("a", "an"):
                words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
            break
    return " ".join(words)


def derangement(n: int, seed: int = 0) -> list[int]:
    """A random permutation of range(n) without fixed points (a cycle through a random order); n >= 2."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partner = list(range(n))
    for here, there in zip(order, order[1:] + order[:1]):
        partner[here] = there
    return partner


@torch.no_grad()
def evaluate(model, held_out_bank: SceneBank, preset: dict, batch_size: int = 64) -> dict:
    """Held-out quality: retrieval top-1/top-5 in groups, and the CLIP score of real scenes, own vs shuffled captions.

    The shuffled captions are a derangement of the scenes (no scene keeps its own); some still have the same text
    (`clip_shuffled_same_text`). `clip_score_own / clip_score_shuffled` is what makes the CLIP-score test of the
    base model (>= 80% of the real scenes' score) meaningful: it must be far above 1. `clip_score_colour_swapped`
    is the score of captions with one colour word wrong (`swap_first_colour`): the score of a nearly right image.
    """
    from innercontrol import metrics

    model.eval()
    tokens = CaptionTokens(held_out_bank.captions)
    image_emb, text_emb = [], []
    for start in range(0, len(held_out_bank), batch_size):
        images, _, captions = held_out_bank.batch(range(start, min(start + batch_size, len(held_out_bank))))
        image_emb.append(image_embeddings(model, (images + 1) / 2))
        text_emb.append(text_embeddings(model, *tokens(captions)))
    captions = held_out_bank.captions
    report = {"held_out_scenes": len(captions), "retrieval_group": min(preset["retrieval_group"], len(captions))}
    report.update(retrieval_accuracy(torch.cat(image_emb), torch.cat(text_emb), captions, preset["retrieval_group"]))

    processor = processor_for(model)
    shuffled = [captions[i] for i in derangement(len(captions))]
    own = metrics.clip_score(held_out_bank.images, captions, model, processor)
    other = metrics.clip_score(held_out_bank.images, shuffled, model, processor)
    recoloured = metrics.clip_score(held_out_bank.images, [swap_first_colour(c) for c in captions], model, processor)
    report.update(
        clip_score_own=float(own.mean()),
        clip_score_shuffled=float(other.mean()),
        clip_score_ratio=float(own.mean() / other.mean().clamp_min(1e-6)),
        clip_own_beats_shuffled=float((own > other).float().mean()),
        clip_shuffled_same_text=sum(a == b for a, b in zip(captions, shuffled)) / len(captions),
        clip_score_colour_swapped=float(recoloured.mean()),
        clip_own_beats_colour_swapped=float((own > recoloured).float().mean()),
        logit_scale=float(model.logit_scale.exp()),
    )
    return report


def save(model, folder: str | Path) -> Path:
    """Write the CLIPModel and its CLIPProcessor (hub layout): what `eval.clip_model=FOLDER` loads."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor_for(model).save_pretrained(folder)
    return folder
