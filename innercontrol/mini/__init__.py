"""The trained miniature of the whole stack (issue 14): VAE, CLIP (text encoder + CLIP-score model), depth model and
SD1.5-shaped UNet, trained on the synthetic scenes by `python -m innercontrol.pretrain_mini`.

    scenes.py   the scene bank: rendered once, cached, train / held-out splits (held-out scenes use another seed)
    stage.py    a resumable training stage: atomic checkpoints, progress bar, CSV log, done marker
    autoencoder.py  the VAE (AutoencoderKL, f/8, 4 latent channels)
    clip.py     CLIP: contrastive scene/caption training; text tower = the pipeline's text encoder; FID features
    depth.py    the depth model (DPTForDepthEstimation): reward and evaluation model of the miniature
    unet.py     the UNet (SD1.5 block layout, small widths) on cached VAE latents and text embeddings
Each stage module has PRESETS ("cpu": the recipe, sized by measurement; "smoke": seconds, for tests), build,
train (resumable), evaluate (held-out quality) and save (hub layout).
"""
