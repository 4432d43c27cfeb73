"""Score networks (method.md section 4.4): the DDPM-style U-Net of both papers, in Flax NNX."""

from krylovjax.models.embeddings import (
    TIME_EMBEDDINGS,
    TimeEmbedding,
    linear_embedding,
    sinusoidal_embedding,
    time_input,
)
from krylovjax.models.unet import (
    PRESETS,
    UNet,
    UNetConfig,
    get_config,
    group_count,
    paper_config,
    param_count,
    tiny_config,
)

__all__ = [
    "UNet",
    "UNetConfig",
    "param_count",
    "group_count",
    "paper_config",
    "tiny_config",
    "get_config",
    "PRESETS",
    "TimeEmbedding",
    "TIME_EMBEDDINGS",
    "sinusoidal_embedding",
    "linear_embedding",
    "time_input",
]
