"""The DDPM baseline (method.md section 6): epsilon prediction, T = 1000, linear betas
1e-4..0.02, EMA 0.9999, lr 2e-4 with warm-up, gradient clipping 1, sinusoidal time embedding,
the paper's U-Net, on built-in 32x32 photos."""

from experiments.configs import train_tiny


def get_config():
    c = train_tiny.get_config()
    c.method = "ddpm"
    c.model = "paper"
    c.model_overrides = {"dropout": 0.1, "dtype": "float32"}  # dtype: "bfloat16" compute on TPUs
    c.lr = 2e-4
    c.warmup_steps = 5000
    c.ema_decay = 0.9999
    c.batch_size = 128
    c.num_steps = 100000
    c.checkpoint_every = 5000
    c.log_every = 100
    c.per_image_offset = False
    c.data.num_images = 64
    return c
