"""The trained miniature of the whole stack (issue 14): VAE, CLIP (text encoder + CLIP-score model), depth model and
SD1.5-shaped UNet, trained on the synthetic scenes by `python -m innercontrol.pretrain_mini`.

    scenes.py   the scene bank: rendered once, cached, train / held-out splits (held-out scenes use another seed)
    stage.py    a resumable training stage: atomic checkpoints, progress bar, CSV log, done marker
    clip.py     CLIP: contrastive scene/caption training; text tower = the pipeline's text encoder; FID features
"""
