"""The CLIP image tower for image variations: picture -> ``clip_img`` of Stage C (spec §7.8, §9).

The official variation recipe conditions Stage C on the ``image_embeds`` of
``openai/clip-vit-large-patch14`` (``CLIPVisionModelWithProjection``, [B, 768], not normalised),
after CLIP's preprocessing: shorter side resized to 224 (bicubic), centre crop 224, scaled to
[0, 1], normalised with CLIP's mean / std. A snapshot holds the tower in ``image_encoder/`` and the
preprocessing settings in ``feature_extractor/preprocessor_config.json``; both are read here, the
settings applied as ``transformers``' ``CLIPImageProcessor`` applies them (tests compare the two),
without needing torchvision.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipPreprocessing:
    """The settings of a ``preprocessor_config.json`` that CLIP's preprocessing uses."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_file(cls, path: str | Path) -> ClipPreprocessing:
        """From ``preprocessor_config.json``; ValueError naming the file for settings it does not
        support (anything but CLIP's resize -> centre crop -> rescale -> normalise)."""
        raw = json.loads(Path(path).read_text())
        size, crop = raw.get("size", {}), raw.get("crop_size", {})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        needed = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")
        if not all(raw.get(k, True) for k in needed) or "shortest_edge" not in size:
            raise ValueError(
                f"{path}: only CLIP's preprocessing is supported (resize of the shortest edge, "
                "centre crop, rescale, normalise)"
            )
        return cls(
            shortest_edge=int(size["shortest_edge"]),
            crop=(int(crop["height"]), int(crop["width"])),
            resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            std=tuple(raw.get("image_std", CLIP_STD)),
        )

    def pixels(self, image: Image.Image) -> Tensor:
        """An RGB picture -> the tower's input [3, crop_h, crop_w] float32.

        Resize: the shorter side to ``shortest_edge``, the longer one to int(edge * long / short)
        (truncated, as transformers does), with PIL on the 8-bit picture; then a centre crop at
        ((H - h) // 2, (W - w) // 2); then rescale and normalise (rescaled in float64, as
        transformers does, before the float32 cast).
        """
        image = image.convert("RGB")
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        array = np.asarray(image.resize(size, resample=self.resample))  # [H, W, 3] uint8
        (crop_h, crop_w), (h, w) = self.crop, array.shape[:2]
        if crop_h > h or crop_w > w:
            raise ValueError(f"centre crop {self.crop} is larger than the resized picture {(h, w)}")
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        array = array[top : top + crop_h, left : left + crop_w]
        scaled = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(((scaled - mean) / std).transpose(2, 0, 1).copy())


class ClipImageEncoder:
    """``CLIPVisionModelWithProjection`` + its preprocessing. ``embed(pictures)`` -> clip_img.

    Not thread-safe (like the pipeline that owns it).
    """

    def __init__(
        self,
        model: CLIPVisionModelWithProjection,
        preprocessing: ClipPreprocessing,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.device, self.dtype = torch.device(device), dtype

    @property
    def dim(self) -> int:
        """The width of ``image_embeds`` (768 for CLIP ViT-L/14)."""
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ClipImageEncoder:
        """From a snapshot root holding ``image_encoder/`` and ``feature_extractor/``. Never touches
        the network."""
        root = Path(root)
        model = CLIPVisionModelWithProjection.from_pretrained(
            root / "image_encoder", local_files_only=True, dtype=dtype
        )
        preprocessing = ClipPreprocessing.from_file(
            root / "feature_extractor" / "preprocessor_config.json"
        )
        return cls(model, preprocessing, device=device, dtype=dtype)

    @staticmethod
    def present(root: str | Path) -> bool:
        """True when ``root`` has both folders ``from_pretrained`` reads."""
        root = Path(root)
        return (root / "image_encoder" / "config.json").is_file() and (
            root / "feature_extractor" / "preprocessor_config.json"
        ).is_file()

    @torch.inference_mode()
    def embed(self, pictures: Sequence[Image.Image]) -> Tensor:
        """RGB pictures -> ``image_embeds`` [B, 1, dim] float32 on the device, one forward."""
        pixels = torch.stack([self.preprocessing.pixels(p) for p in pictures])
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return out.image_embeds.float().unsqueeze(1)


def random_clip_vision_model(
    projection_dim: int, *, width: int = 32, layers: int = 2, image_size: int = 32, seed: int = 0
) -> CLIPVisionModelWithProjection:
    """A small randomly initialised tower (patch 8), for tests: deterministic for ``seed``."""
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config)
