"""Training Stable Diffusion from scratch, in three stages that share one loop.

- :mod:`opensd.training.vae`: the KL autoencoder (``opensd train vae``);
- :mod:`opensd.training.clip`: a text encoder pre-trained contrastively (``opensd train clip``);
- :mod:`opensd.training.unet`: the latent diffusion U-Net on cached latents (``opensd train unet``),
  which exports a complete opensd model folder.

:mod:`opensd.training.taesd` distils a tiny autoencoder (TAESD) from a trained model's VAE
(``opensd train taesd``).

:mod:`opensd.training.loop` is the shared trainer (checkpoints, exact resume, DDP,
logs), :mod:`opensd.training.config` the configs and their TOML reader,
:mod:`opensd.training.data` the data sources, batches and latent cache. See
``docs/training.md``.
"""
