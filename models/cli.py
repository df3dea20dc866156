"""Generate images from a prompt on the command line, through the same pipeline the service uses.

    python -m models.cli "a red circle on a blue background" -o out.png     # built-in demo model
    python -m models.cli "a cat" --weights /snapshots/stable-cascade --num-images 2 -o cat.png
    # -> cat-0.png, cat-1.png

Sampling parameters left out take the model's own defaults (``pipeline.defaults``). Progress goes to
stderr as one plain line per stage; the seed used is printed so a result can be reproduced, here or
over HTTP (seeds are 0 .. 2^32-1 in both). The demo model warns about a prompt it does not know.
"""

from __future__ import annotations

import argparse
import secrets
import struct
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from models.demo_vocabulary import grammar_for_model
from models.pipeline import CascadePipeline
from models.request import MAX_SEED, GenerationParams, InvalidParams, NonFiniteOutput

_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Besides OSError, what Pillow raises for a corrupt file (service/image_input.py refuses the same).
_BAD_PICTURE = (SyntaxError, ValueError, struct.error, EOFError, IndexError, KeyError)
_SAMPLING = (
    "prior_steps",
    "prior_guidance_scale",
    "prior_shift",
    "decoder_steps",
    "decoder_guidance_scale",
    "decoder_shift",
    "cfg_rho",
)


class PictureError(ValueError):
    """--image names a file that cannot be read as a picture."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m models.cli", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument(
        "-o", "--output", default="out.png", help="PNG path; with --num-images N: stem-0.png ..."
    )
    p.add_argument("--negative-prompt", default="")
    p.add_argument(
        "--weights",
        metavar="DIR",
        help="Stable Cascade snapshot directory (default: the built-in demo model)",
    )
    p.add_argument("--prior-variant", choices=("lite", "big"), default="lite")
    p.add_argument("--decoder-variant", choices=("lite", "big"), default="lite")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="auto")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, help=f"0 .. {MAX_SEED}; default: random (printed)")
    for name in _SAMPLING:
        p.add_argument("--" + name.replace("_", "-"), type=int if name.endswith("steps") else float)
    p.add_argument(
        "--image",
        metavar="FILE",
        help="input picture: image-to-image (with a prompt) or a "
        'variation (with an empty prompt ""); default size: the picture\'s, snapped',
    )
    p.add_argument(
        "--strength",
        type=float,
        help="with --image: how far from the picture to start, (0, 1]; default 0.8 with a prompt, "
        "1.0 (a variation from noise) without",
    )
    p.add_argument(
        "--image-variation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="condition on the picture's CLIP embedding (default: when the prompt is empty)",
    )
    return p


def read_picture(path: str) -> Image.Image:
    """--image's file as the pipeline takes it (``models.picture.as_rgb``: upright, opaque RGB).
    Raises PictureError naming what is wrong, in one line."""
    from models.picture import as_rgb

    try:
        with Image.open(path) as opened:
            return as_rgb(opened)
    except UnidentifiedImageError:
        raise PictureError(f"{path}: not a picture format Pillow reads") from None
    except Image.DecompressionBombError as err:
        raise PictureError(f"{path}: {err}") from None
    except OSError as err:  # a missing or unreadable file, or a truncated one
        raise PictureError(f"{path}: {err.strerror or err}") from None
    except _BAD_PICTURE as err:  # what Pillow's decoders raise for corrupt data
        raise PictureError(f"{path}: corrupt picture ({err})") from None


def image_fields(
    args: argparse.Namespace, picture: Image.Image | None, pipe: CascadePipeline
) -> dict[str, object]:
    """The image fields of the request (empty without a picture): the picture, the strength and
    the variation flag with their defaults, and the picture's size snapped to the model's
    limits when --width / --height are not given."""
    if picture is None:
        return {}
    empty = not args.prompt.strip()
    fields: dict[str, object] = {
        "image": picture,
        "strength": args.strength if args.strength is not None else (1.0 if empty else 0.8),
        "image_variation": args.image_variation if args.image_variation is not None else empty,
    }
    if args.width is None and args.height is None:
        fields["width"], fields["height"] = pipe.limits.snap(*picture.size)
    return fields


def _progress(stage: str, step: int, total: int) -> None:
    """A plain text bar on stderr, redrawn in place: ``prior   [#######-------]  10/20``."""
    filled = round(20 * step / total)
    end = "\n" if step == total else ""
    print(
        f"\r{stage:<8}[{'#' * filled}{'-' * (20 - filled)}] {step:>3}/{total}",
        end=end,
        file=sys.stderr,
    )


def load_pipeline(args: argparse.Namespace) -> CascadePipeline:
    """The built-in demo model, or a snapshot directory when --weights is given."""
    device = None if args.device == "auto" else args.device
    if args.weights is None:
        from models.demo import load_demo_pipeline

        return load_demo_pipeline(device=device or "cpu", dtype=torch.float32)
    return CascadePipeline.from_snapshot(
        args.weights,
        prior_variant=args.prior_variant,
        decoder_variant=args.decoder_variant,
        device=device,
        dtype=_DTYPES[args.dtype],
    )


def output_paths(output: str, count: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for several."""
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, generate, write the PNG(s). Returns the process exit code."""
    args = _parser().parse_args(argv)
    try:  # before the model loads, which can take minutes with real weights
        picture = None if args.image is None else read_picture(args.image)
    except PictureError as err:
        print(f"error: --image {err}", file=sys.stderr)
        return 2
    try:
        pipe = load_pipeline(args)
    except (OSError, ValueError) as err:  # missing/broken weights (CheckpointError is a ValueError)
        print(f"error: cannot load the model: {err}", file=sys.stderr)
        return 2
    # Random, but every image's seed (seed + i) stays one the server accepts too.
    random_seed = secrets.randbelow(max(1, MAX_SEED - args.num_images + 2))
    seed = args.seed if args.seed is not None else random_seed
    given = {
        name: getattr(args, name)
        for name in ("width", "height", *_SAMPLING)
        if getattr(args, name) is not None
    }
    params = GenerationParams.from_defaults(
        pipe.defaults,
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        seed=seed,
        **{**image_fields(args, picture, pipe), **given},
    )
    print(
        f"model: {pipe.model_info.get('name')} ({pipe.model_info.get('weights', '')}) "
        f"on {pipe.device}",
        file=sys.stderr,
    )
    print(f"seed: {seed}")
    grammar = grammar_for_model(pipe.model_info)
    if grammar is not None:
        for warning in grammar.check(
            args.prompt, args.negative_prompt, real_weights="real weights (--weights DIR)"
        ):
            print(f"warning: {warning}", file=sys.stderr)
    try:
        result = pipe.generate([params], on_step=_progress).results[0]
    except InvalidParams as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if isinstance(result, NonFiniteOutput):
        print(f"error: {result}", file=sys.stderr)
        return 1
    if result.prompt_truncated:
        print("warning: the prompt was longer than 77 tokens and was truncated", file=sys.stderr)
    for path, image in zip(output_paths(args.output, args.num_images), result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)  # [3, H, W] -> [H, W, 3] uint8
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
