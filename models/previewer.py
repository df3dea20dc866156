"""Previewer: a small conv net turning a Stage C latent into a rough RGB preview at 8x its size.

Every stage is conv -> GELU -> BatchNorm; three stride-2 2x2 ConvTransposes give the x8
upsampling. Widths in terms of h = ``c_hidden``: h, h, h/2, h/2, h/4, h/4, h/4, h/4. The output is
about [0, 1] but not clamped.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.config import PreviewerConfig


def _stage(conv: nn.Module, c_out: int) -> list[nn.Module]:
    return [conv, nn.GELU(), nn.BatchNorm2d(c_out)]


class Previewer(nn.Module):
    """Stage C latent -> RGB preview; ``blocks.0`` .. ``blocks.24`` match the official keys."""

    def __init__(self, config: PreviewerConfig) -> None:
        super().__init__()
        if config.c_hidden % 4 != 0:
            raise ValueError(
                f"PreviewerConfig.c_hidden must be divisible by 4, got {config.c_hidden}"
            )
        self.config = config
        h, h2, h4 = config.c_hidden, config.c_hidden // 2, config.c_hidden // 4
        self.blocks = nn.Sequential(
            *_stage(nn.Conv2d(config.c_in, h, kernel_size=1), h),
            *_stage(nn.Conv2d(h, h, kernel_size=3, padding=1), h),
            *_stage(nn.ConvTranspose2d(h, h2, kernel_size=2, stride=2), h2),
            *_stage(nn.Conv2d(h2, h2, kernel_size=3, padding=1), h2),
            *_stage(nn.ConvTranspose2d(h2, h4, kernel_size=2, stride=2), h4),
            *_stage(nn.Conv2d(h4, h4, kernel_size=3, padding=1), h4),
            *_stage(nn.ConvTranspose2d(h4, h4, kernel_size=2, stride=2), h4),
            *_stage(nn.Conv2d(h4, h4, kernel_size=3, padding=1), h4),
            nn.Conv2d(h4, config.c_out, kernel_size=1),
        )

    def forward(self, latent: Tensor) -> Tensor:
        """latent: [B, c_in, h, w] -> preview [B, c_out, 8h, 8w] (not clamped)."""
        if latent.dim() != 4 or latent.shape[1] != self.config.c_in:
            raise ValueError(
                f"Previewer: latent must be [B, {self.config.c_in}, h, w], got {list(latent.shape)}"
            )
        return self.blocks(latent)
