"""EfficientNetV2-S feature encoder: image -> 16-channel Stage C latent space (stride 32).

The backbone is the ``features`` part of EfficientNetV2-S (Tan & Le, 2021), written out in plain
PyTorch with module names chosen so that ``state_dict`` keys equal torchvision's
``efficientnet_v2_s().features`` under the ``backbone.`` prefix (``backbone.0.0.weight``,
``backbone.N.M.block.K...``, SE ``fc1``/``fc2``), which is what the official
``effnet_encoder.safetensors`` holds. A 1x1 conv plus a non-affine BatchNorm (``mapper``) projects
the 1280 features to ``c_latent`` channels that are roughly N(0, 1).

Input to ``forward`` is ImageNet-normalised RGB (see ``EfficientNetEncoder.preprocess``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import EfficientNetConfig

BN_EPS = 1e-3  # torchvision's EfficientNet BatchNorm eps; the mapper's BatchNorm keeps 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBNAct(nn.Sequential):
    """``0`` bias-free conv, padding (k-1)/2; ``1`` BatchNorm (eps 1e-3); ``2`` SiLU if ``act``.

    The symmetric padding gives ceil semantics for stride 2: out = ceil(in / 2).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, eps=BN_EPS),
        ]
        if act:
            layers.append(nn.SiLU())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel gate: x * sigmoid(fc2(SiLU(fc1(mean_hw(x))))); fc1/fc2 are 1x1 convs with bias."""

    def __init__(self, c: int, c_squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c_squeeze, 1)
        self.fc2 = nn.Conv2d(c_squeeze, c, 1)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        s = x.mean(dim=(2, 3), keepdim=True)  # (B, C, H, W) -> (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class FusedMBConv(nn.Module):
    """Fused inverted residual: k x k (strided) expand conv, then a 1x1 projection.

    With expand ratio 1 there is only the k x k conv (to c_out, with SiLU). The residual is added
    when stride is 1 and c_in == c_out; stochastic depth is a no-op at inference.
    """

    def __init__(self, expand: int, kernel_size: int, stride: int, c_in: int, c_out: int) -> None:
        super().__init__()
        c_mid = c_in * expand
        if c_mid == c_in:
            self.block = nn.Sequential(ConvBNAct(c_in, c_out, kernel_size, stride))
        else:
            self.block = nn.Sequential(
                ConvBNAct(c_in, c_mid, kernel_size, stride), ConvBNAct(c_mid, c_out, 1, act=False)
            )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, c_in, H, W] -> [B, c_out, ceil(H/stride), ceil(W/stride)]."""
        out = self.block(x)
        return out + x if self.residual else out


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise k x k (strided), squeeze-excitation, 1x1 projection.

    The SE bottleneck width is max(1, c_in // 4), computed from the block's *input* width.
    """

    def __init__(self, expand: int, kernel_size: int, stride: int, c_in: int, c_out: int) -> None:
        super().__init__()
        c_mid = c_in * expand  # every V2-S width is a multiple of 8, so no rounding is needed
        self.block = nn.Sequential(
            ConvBNAct(c_in, c_mid, 1),
            ConvBNAct(c_mid, c_mid, kernel_size, stride, groups=c_mid),
            SqueezeExcitation(c_mid, max(1, c_in // 4)),
            ConvBNAct(c_mid, c_out, 1, act=False),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, c_in, H, W] -> [B, c_out, ceil(H/stride), ceil(W/stride)]."""
        out = self.block(x)
        return out + x if self.residual else out


def efficientnet_features(config: EfficientNetConfig | None = None) -> nn.Sequential:
    """EfficientNet ``features`` (V2-S by default): [B, 3, H, W] -> [B, head, ceil(H/32), ceil(W/32)]."""
    config = config or EfficientNetConfig()
    layers: list[nn.Module] = [ConvBNAct(3, config.stem, 3, stride=2)]
    for kind, expand, k, stride, c_in, c_out, n in config.stages:
        block = FusedMBConv if kind == "fused" else MBConv
        # Only the first layer of a stage strides and changes width.
        stage = [block(expand, k, stride, c_in, c_out)]
        stage += [block(expand, k, 1, c_out, c_out) for _ in range(n - 1)]
        layers.append(nn.Sequential(*stage))
    layers.append(ConvBNAct(config.stages[-1][5], config.head, 1))
    return nn.Sequential(*layers)


class EfficientNetEncoder(nn.Module):
    """Image -> Stage C latent: ``mapper(backbone(x))``, stride 32, ceil semantics (768 -> 24)."""

    def __init__(self, config: EfficientNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = efficientnet_features(config)
        self.mapper = nn.Sequential(
            nn.Conv2d(config.head, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent, affine=False),
        )

    @staticmethod
    def preprocess(image: Tensor) -> Tensor:
        """ImageNet normalisation: image [B, 3, H, W] RGB in [0, 1] -> normalised [B, 3, H, W].

        No resizing happens here or in ``forward``; resize beforehand (Stage C was trained at
        768 px, sides multiples of 32).
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(
                "EfficientNetEncoder.preprocess: image must be [B, 3, H, W], "
                f"got {list(image.shape)}"
            )
        mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
        return (image - mean) / std

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] ImageNet-normalised -> [B, c_latent, ceil(H/32), ceil(W/32)]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"EfficientNetEncoder: input must be [B, 3, H, W], got {list(x.shape)}"
            )
        return self.mapper(self.backbone(x))
