"""The generation expert's sample space (BAGEL's VAE role): a latent autoencoder, or pixels.

``kind: conv`` is a small convolutional autoencoder: 64x64 RGB in [-1, 1] <-> a
``latent_channels x s x s`` latent, one 2x down-scaling per entry of ``channels``: two levels
(``s = 16``, 4x down per side) or three (``s = 8``, 8x down, the f8 latents of Stable Diffusion
and BAGEL's VAE, with more channels). Strided convolutions go down and sub-pixel convolutions
(pixel shuffle) go up, so no convolution runs at full resolution. The
decoder is trained on slightly noised latents, so it maps the small errors a sampler leaves back
to clean, flat-coloured shapes. ``calibrate`` stores the latents' mean and standard deviation
(buffers, saved with the weights) so the flow model works on unit-variance latents, as
diffusers' ``scaling_factor`` does.

``kind: pixel`` has no weights (:class:`PixelSpace`): the generation expert works on the image
itself in [-1, 1], as a pixel-space diffusion model does, at ``1 / pixel_factor`` of its side:
``encode`` averages ``pixel_factor x pixel_factor`` blocks, ``decode`` scales back up
bicubically. At factor 2 a shapes scene loses nothing the benchmarks see (GenEval-shapes scores
1.0 on its oracle scenes drawn at 32x32 and scaled back) while the generator draws a quarter of
the pixels. :func:`make_autoencoder` builds either from its config.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class AutoencoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["conv", "pixel"] = Field("conv", description="conv: the latent autoencoder; pixel: the image")
    image_size: int = Field(64, ge=8)
    latent_channels: int = Field(4, ge=1)
    channels: tuple[int, ...] = Field((32, 64), min_length=1, max_length=4,
                                      description="conv: channels at 1/2, 1/4, ... resolution (one entry per level)")
    latent_noise: float = Field(0.1, ge=0, description="decoder training noise, relative to the latent std")
    pixel_factor: int = Field(1, ge=1, le=4, description="pixel space: the generator draws at image_size / this")

    @model_validator(mode="after")
    def _check(self) -> "AutoencoderConfig":
        if self.image_size % self.down:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the space's down-scaling")
        return self

    @property
    def down(self) -> int:
        """Down-scaling per side of the sample space."""
        return self.pixel_factor if self.kind == "pixel" else 2 ** len(self.channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.down

    @property
    def sample_channels(self) -> int:
        """Channels of what the generation expert draws (RGB in pixel space)."""
        return 3 if self.kind == "pixel" else self.latent_channels


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class _Space(nn.Module):
    """What both sample spaces share: their config (of this class's ``kind``) and the image check."""

    kind: str

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.kind != self.kind:
            raise ValueError(f"{type(self).__name__} is the {self.kind!r} kind; build {cfg.kind!r} with "
                             "make_autoencoder")
        self.cfg = cfg

    def check_image(self, images: torch.Tensor) -> None:
        s = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images of shape (B, 3, {s}, {s}), got {tuple(images.shape)}")


class Autoencoder(_Space):
    kind = "conv"
    trainable = True

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__(cfg)
        ch, z = list(cfg.channels), cfg.latent_channels
        down: list[nn.Module] = []
        for i, c in enumerate(ch):  # each level halves the side; the deepest has a second block
            down += [nn.Conv2d(ch[i - 1] if i else 3, c, 4, stride=2, padding=1), ResBlock(c)]
        self.encoder = nn.Sequential(*down, ResBlock(ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], z, 1))
        up: list[nn.Module] = [nn.Conv2d(z, ch[-1], 3, padding=1), ResBlock(ch[-1]), ResBlock(ch[-1])]
        for c_in, c_out in zip(ch[::-1], ch[-2::-1]):
            up += [nn.SiLU(), nn.Conv2d(c_in, 4 * c_out, 3, padding=1), nn.PixelShuffle(2), ResBlock(c_out),
                   ResBlock(c_out)]
        self.decoder = nn.Sequential(*up, nn.SiLU(), nn.Conv2d(ch[0], 4 * 3, 3, padding=1), nn.PixelShuffle(2))
        self.register_buffer("latent_mean", torch.zeros(1, z, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, z, 1, 1))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised latents."""
        self.check_image(images)
        return (self.encoder(images) - self.latent_mean) / self.latent_std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images (not clamped)."""
        return self.decoder(latents * self.latent_std + self.latent_mean)

    @property
    def is_calibrated(self) -> bool:
        return not (bool((self.latent_mean == 0).all()) and bool((self.latent_std == 1).all()))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss: reconstruction (L1 + MSE) from noised latents."""
        z = self.encoder(images)
        noise = torch.randn_like(z) * (self.cfg.latent_noise * z.detach().std())
        rec = self.decoder(z + noise)
        l1 = (rec - images).abs().mean()
        mse = F.mse_loss(rec, images)
        return l1 + mse, {"ae_l1": l1.item(), "ae_mse": mse.item()}

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor) -> None:
        """Set the latent normalisation from a batch of images (per-channel mean and std)."""
        z = self.encoder(images)
        self.latent_mean.copy_(z.mean(dim=(0, 2, 3), keepdim=True))
        self.latent_std.copy_(z.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))


class PixelSpace(_Space):
    """The image itself, at ``1 / pixel_factor`` of its side; no weights, nothing to train."""

    kind = "pixel"
    trainable = False
    is_calibrated = True

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_image(images)
        f = self.cfg.pixel_factor
        return F.avg_pool2d(images, f) if f > 1 else images

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        f = self.cfg.pixel_factor
        if f == 1:
            return samples
        return F.interpolate(samples, scale_factor=f, mode="bicubic", align_corners=False)

    def calibrate(self, images: torch.Tensor) -> None:
        """Nothing to calibrate: pixels are already in [-1, 1]."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise ValueError("the pixel space has nothing to train")


SampleSpace = Autoencoder | PixelSpace


def make_autoencoder(cfg: AutoencoderConfig) -> SampleSpace:
    return PixelSpace(cfg) if cfg.kind == "pixel" else Autoencoder(cfg)
