"""The miniature's CLIP stage (innercontrol/mini/clip.py): training, resume, loss, retrieval, CLIP score, save/load."""

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from innercontrol import metrics
from innercontrol.mini import clip
from innercontrol.mini.scenes import SceneBank

from .helpers import killed_after_first_checkpoint_then_resumed

SMOKE = clip.PRESETS["smoke"]


@pytest.fixture(scope="module")
def bank():
    return SceneBank.render(num=40, resolution=32, seed=3, progress=False)


@pytest.fixture(scope="module")
def trained(bank, tmp_path_factory):
    return clip.train(bank, SMOKE, tmp_path_factory.mktemp("clip_work"), seed=0, progress=False)


def fixed_batch_loss(model, bank):
    images, _, captions = bank.batch(range(16))
    input_ids, attention_mask = clip.CaptionTokens(bank.captions)(captions)
    with torch.no_grad():
        image_emb = clip.image_embeddings(model, (images + 1) / 2)
        text_emb = clip.text_embeddings(model, input_ids, attention_mask)
        return float(clip.contrastive_loss(image_emb, text_emb, model.logit_scale, captions)[0])


def test_smoke_training_lowers_the_loss(trained, bank):
    assert not trained.training
    before = fixed_batch_loss(clip.build(SMOKE, seed=0), bank)
    after = fixed_batch_loss(trained, bank)
    assert np.isfinite(after) and after < before - 0.05, (before, after)


def test_resumed_run_equals_an_uninterrupted_one(bank, trained, tmp_path, monkeypatch):
    step, resumed = killed_after_first_checkpoint_then_resumed(
        lambda work: clip.train(bank, SMOKE, work, seed=0, progress=False), tmp_path, monkeypatch
    )
    assert step == SMOKE["checkpoint_every"]
    straight = trained.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, straight[name], rtol=0, atol=1e-6, msg=name)
    # A finished stage is loaded, not retrained.
    again = clip.train(bank, SMOKE, tmp_path, seed=0, progress=False)
    torch.testing.assert_close(again.logit_scale, trained.logit_scale, rtol=0, atol=1e-6)


def test_contrastive_loss_counts_pairs_with_the_same_caption_as_positives():
    image_emb = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0]])
    text_emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    captions = ["a red circle", "a red circle", "a blue square"]
    scale = 2.0
    loss, accuracy = clip.contrastive_loss(image_emb, text_emb, torch.tensor(np.log(scale)), captions)
    logits = scale * image_emb.numpy() @ text_emb.numpy().T
    targets = np.array([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])

    def soft_cross_entropy(rows):
        log_softmax = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -(targets * log_softmax).sum(axis=1).mean()

    assert float(loss) == pytest.approx((soft_cross_entropy(logits) + soft_cross_entropy(logits.T)) / 2, rel=1e-6)
    # image 0 -> text 0 (own), image 1 -> text 0 (not its own, but the same caption), image 2 -> text 2 (own)
    assert float(accuracy) == pytest.approx(1.0)
    # The learned temperature is clamped at CLIP's 100.
    hot, _ = clip.contrastive_loss(image_emb, text_emb, torch.tensor(10.0), captions)
    capped, _ = clip.contrastive_loss(image_emb, text_emb, torch.tensor(np.log(100.0)), captions)
    assert float(hot) == pytest.approx(float(capped), rel=1e-6)


def test_retrieval_accuracy_against_ranks_counted_by_hand():
    generator = torch.Generator().manual_seed(0)
    image_emb, text_emb = torch.randn(19, 4, generator=generator), torch.randn(19, 4, generator=generator)
    captions = [f"caption {i % 6}" for i in range(19)]
    ours = clip.retrieval_accuracy(image_emb, text_emb, captions, group=8)
    expected = {}
    for start in (0, 8):  # two full groups of 8; the last 3 scenes are dropped
        cosine = torch.nn.functional.cosine_similarity(
            image_emb[start : start + 8, None], text_emb[None, start : start + 8], dim=-1
        ).numpy()
        for direction, scores in (("i2t", cosine), ("t2i", cosine.T)):
            for i in range(8):
                for k in (1, 5):
                    top = sorted(range(8), key=lambda j: -scores[i, j])[:k]
                    own = i in top
                    same = any(captions[start + j] == captions[start + i] for j in top)
                    expected[f"{direction}_top{k}"] = expected.get(f"{direction}_top{k}", 0) + own / 16
                    expected[f"{direction}_top{k}_caption"] = expected.get(f"{direction}_top{k}_caption", 0) + same / 16
    assert ours == pytest.approx(expected)
    perfect = clip.retrieval_accuracy(image_emb, image_emb, captions, group=8)
    assert perfect["i2t_top1"] == perfect["t2i_top1"] == 1.0


def test_derangement_moves_every_scene():
    for n in (2, 3, 50):
        partner = clip.derangement(n, seed=n)
        assert sorted(partner) == list(range(n))
        assert all(partner[i] != i for i in range(n))


def test_save_loads_with_transformers_and_scores_as_evaluate(trained, bank, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    folder = clip.save(trained, tmp_path / "clip")
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # The saved processor feeds the model as training did: same pixels (no resize at the vision size), same tokens.
    images = bank.images[:4]
    expected_pixels = clip.pixel_values(images.float() / 255, SMOKE["image_size"])
    inputs = processor(text=bank.captions[:4], images=metrics._as_pil_list(images), return_tensors="pt", padding=True)
    torch.testing.assert_close(inputs["pixel_values"], expected_pixels, rtol=0, atol=1e-5)
    input_ids, attention_mask = clip.CaptionTokens(bank.captions)(bank.captions[:4])
    assert torch.equal(inputs["input_ids"], input_ids) and torch.equal(inputs["attention_mask"], attention_mask)

    report = clip.evaluate(trained, bank, SMOKE)
    own = metrics.clip_score(bank.images, bank.captions, model, processor)
    assert report["clip_score_own"] == pytest.approx(float(own.mean()), abs=1e-4)
    assert report["held_out_scenes"] == 40 and report["retrieval_group"] == SMOKE["retrieval_group"]
    for key in ("i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5", "i2t_top1_caption", "t2i_top5_caption"):
        assert 0.0 <= report[key] <= 1.0
    assert report["i2t_top1"] <= report["i2t_top1_caption"] and report["i2t_top1"] <= report["i2t_top5"]


def test_text_encoder_is_the_text_tower_and_padding_does_not_change_it(trained, bank):
    from innercontrol.models import encode_prompts
    from innercontrol.tiny import tiny_tokenizer

    encoder = clip.text_encoder(trained)
    captions = bank.captions[:3]
    hidden = encode_prompts(tiny_tokenizer(), encoder, captions, "cpu")  # the pipeline's 77 positions
    assert hidden.shape == (3, 77, SMOKE["text_width"])
    input_ids, attention_mask = clip.CaptionTokens(bank.captions)(captions)  # training pads to the longest caption
    with torch.no_grad():
        short = trained.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    for i in range(3):
        length = int(attention_mask[i].sum())
        torch.testing.assert_close(hidden[i, :length], short[i, :length], rtol=0, atol=1e-5)


def test_image_features_serve_as_fid_features(trained, bank, tmp_path):
    for name, images in (("a", bank.images[:12]), ("b", bank.images[12:24])):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / name / f"{i}.png")
    extractor = partial(clip.image_features, trained)
    clean_fid_batch = torch.rand(2, 3, 299, 299) * 255
    features = extractor(clean_fid_batch)
    assert features.shape == (2, SMOKE["projection_dim"])
    torch.testing.assert_close(features, clip.image_embeddings(trained, clean_fid_batch / 255).detach())
    same = metrics.fid(tmp_path / "a", tmp_path / "a", feature_extractor=extractor)
    different = metrics.fid(tmp_path / "a", tmp_path / "b", feature_extractor=extractor)
    assert abs(same) < 1e-3 and different > 10 * abs(same) + 1e-3


def test_swap_first_colour_changes_one_word_and_its_article():
    assert clip.swap_first_colour("a red circle in front of a blue square on a plain background") == (
        "a green circle in front of a blue square on a plain background"
    )
    assert clip.swap_first_colour("a yellow square on a dotted background") == "an orange square on a dotted background"
    assert (
        clip.swap_first_colour("an orange circle on a striped background") == "a purple circle on a striped background"
    )
    assert clip.swap_first_colour("a black triangle on a plain background") == "a red triangle on a plain background"
