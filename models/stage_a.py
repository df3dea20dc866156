"""Stage A: the VQGAN between RGB images in [0, 1] and continuous 4-channel latents.

Notation: ``c_hidden`` is the width of the deepest level; level i has width
``c_levels[i] = c_hidden // 2**(levels - 1 - i)`` (level 0 is the shallowest). The encoder reduces
H and W by ``2**levels`` (a pixel-unshuffle by 2, then one stride-2 conv per extra level); the
decoder undoes it.

Latents are the encoder's BatchNorm output divided by ``scale_factor`` (0.43 for the released
weights), which is what Stage B was trained on. Decoding never quantizes; the codebook is only used
by ``encode(..., quantize=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import StageAConfig


class ResBlock(nn.Module):
    """Stage A residual block: depthwise 3x3 mixing and a channelwise MLP, gated by scalars.

    Unlike the Stage B/C ResBlock, the depthwise conv pads by replication and the two LayerNorms are
    non-affine; the six ``gammas`` g0..g5 act as their scale/shift and as the residual gates (all
    zero at construction, which makes a fresh block the identity).
    """

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(
            nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c)
        )
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        g = self.gammas
        # LayerNorm over channels: (B, C, H, W) -> (B, H, W, C) -> back to (B, C, H, W).
        t = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(t) * g[2]
        t = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]  # (B, H, W, C)
        return x + self.channelwise(t).permute(0, 3, 1, 2) * g[5]  # (B, H, W, C) -> (B, C, H, W)


class VectorQuantizer(nn.Module):
    """Nearest (L2) lookup into a codebook of ``codebook_size`` vectors of ``c`` channels."""

    def __init__(self, c: int, codebook_size: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, c)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z: [B, C, H, W] -> (quantized [B, C, H, W] of codebook rows, indices [B, H, W] int64)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B, C, H, W) -> (B*H*W, C)
        book = self.codebook.weight
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; the |z|^2 term does not change the argmin.
        dist = book.pow(2).sum(1)[None, :] - 2 * flat @ book.t()
        indices = dist.argmin(dim=1)
        # (B*H*W, C) -> (B, H, W, C) -> (B, C, H, W)
        quantized = book[indices].reshape(b, h, w, c).permute(0, 3, 1, 2)
        return quantized, indices.reshape(b, h, w)


class StageA(nn.Module):
    """The VQGAN: ``encode`` maps [0, 1] RGB to scaled latents, ``decode`` maps them back.

    Attribute names match the official checkpoint (``in_block``, ``down_blocks``,
    ``vquantizer.codebook``, ``up_blocks``, ``out_block``), so ``stage_a.safetensors`` loads with a
    strict ``load_state_dict``.
    """

    def __init__(self, config: StageAConfig) -> None:
        super().__init__()
        if config.levels < 1 or config.bottleneck_blocks < 1:
            raise ValueError(
                f"StageAConfig: levels ({config.levels}) and bottleneck_blocks "
                f"({config.bottleneck_blocks}) must be >= 1"
            )
        if config.c_hidden % 2 ** (config.levels - 1) != 0:
            raise ValueError(
                f"StageAConfig.c_hidden ({config.c_hidden}) must be divisible by 2**(levels-1) "
                f"= {2 ** (config.levels - 1)}"
            )
        self.config = config
        levels, c_latent = config.levels, config.c_latent
        c_levels = [config.c_hidden // 2 ** (levels - 1 - i) for i in range(levels)]

        # Encoder: pixel-unshuffle (H/2), then per level an optional stride-2 conv and one ResBlock.
        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, c_levels[0], kernel_size=1)
        )
        down: list[nn.Module] = []
        for i, c in enumerate(c_levels):
            if i > 0:
                down.append(nn.Conv2d(c_levels[i - 1], c, kernel_size=4, stride=2, padding=1))
            down.append(ResBlock(c, 4 * c))
        down.append(
            nn.Sequential(
                nn.Conv2d(c_levels[-1], c_latent, kernel_size=1, bias=False),
                nn.BatchNorm2d(c_latent),
            )
        )
        self.down_blocks = nn.Sequential(*down)

        self.vquantizer = VectorQuantizer(c_latent, config.codebook_size)

        # Decoder: deepest level first; the bottleneck ResBlocks run at the latent resolution.
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(c_latent, c_levels[-1], kernel_size=1))]
        for i in reversed(range(levels)):
            n_blocks = config.bottleneck_blocks if i == levels - 1 else 1
            up.extend(ResBlock(c_levels[i], 4 * c_levels[i]) for _ in range(n_blocks))
            if i > 0:
                up.append(nn.ConvTranspose2d(c_levels[i], c_levels[i - 1], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(c_levels[0], 3 * 4, kernel_size=1), nn.PixelShuffle(2)
        )

    @property
    def downscale(self) -> int:
        """Spatial factor between an image and its latent (4 for the released model)."""
        return 2**self.config.levels

    def encode(self, image: Tensor, quantize: bool = False) -> Tensor:
        """image: [B, 3, H, W] RGB in [0, 1] -> latent [B, c_latent, H/f, W/f], f = ``downscale``.

        H and W must be multiples of f (4 for the released model). The latent is the BatchNorm
        output divided by ``scale_factor``. With ``quantize=True`` every latent pixel is first
        snapped to its nearest codebook vector (then divided by ``scale_factor`` the same way).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"StageA.encode: image must be [B, 3, H, W], got {list(image.shape)}")
        f = self.downscale
        if image.shape[2] % f or image.shape[3] % f:
            raise ValueError(
                f"StageA.encode: image height and width must be multiples of {f}, "
                f"got {list(image.shape[2:])}"
            )
        z = self.down_blocks(self.in_block(image))
        if quantize:
            z, _ = self.vquantizer(z)
        return z / self.config.scale_factor

    def decode(self, latent: Tensor) -> Tensor:
        """latent: [B, c_latent, h, w] (from ``encode``) -> image [B, 3, h*f, w*f], about [0, 1].

        The output is not clamped; clamp for display.
        """
        if latent.dim() != 4 or latent.shape[1] != self.config.c_latent:
            raise ValueError(
                f"StageA.decode: latent must be [B, {self.config.c_latent}, h, w], "
                f"got {list(latent.shape)}"
            )
        return self.out_block(self.up_blocks(latent * self.config.scale_factor))

    def forward(self, image: Tensor) -> Tensor:
        """Round trip: image [B, 3, H, W] -> reconstructed image [B, 3, H, W]."""
        return self.decode(self.encode(image))
