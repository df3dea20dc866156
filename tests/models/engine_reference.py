"""Reference outputs of the pipeline, recorded before generation became resumable step state.

``python -m tests.models.engine_reference`` writes ``tests/data/engine_reference/demo.safetensors``:
uint8 images [n, 3, H, W] of the built-in demo model for the requests below, each batch as one
``generate`` call. ``test_engine_reference.py`` regenerates them with the current code and compares.
Re-record only for a deliberate change of the sampler's maths, and say so in the commit.
"""

from __future__ import annotations

from pathlib import Path

from models.request import GenerationParams

FILE = Path(__file__).resolve().parents[1] / "data" / "engine_reference" / "demo.safetensors"


def cases() -> dict[str, list[GenerationParams]]:
    """Named batches: a mixed batch (2-image request, negative prompt, guidance 1 rows), each of its
    requests alone, and another size with other step counts."""
    mixed = [
        GenerationParams(
            "a red circle at the left on a blue background", width=128, height=128,
            num_images=2, seed=7, decoder_guidance_scale=1.5,
        ),
        GenerationParams(
            "a green square on a yellow background", negative_prompt="a red background",
            width=128, height=128, seed=11, prior_guidance_scale=6.0, decoder_guidance_scale=1.5,
        ),
        GenerationParams(
            "a white triangle at the right on a black background", width=128, height=128,
            seed=3, prior_guidance_scale=1.0, decoder_guidance_scale=1.0,
        ),
    ]
    other = GenerationParams(
        "a purple circle on an orange background", width=192, height=128, seed=5,
        prior_steps=8, decoder_steps=4, decoder_guidance_scale=1.5,
    )
    return {
        "mixed": mixed,
        **{f"alone{i}": [p] for i, p in enumerate(mixed)},
        "other_size": [other],
    }


def render(pipeline) -> dict[str, torch.Tensor]:  # noqa: F821
    """``{case: uint8 [n, 3, H, W]}``: each case's images, concatenated in request order."""
    import torch

    out = {}
    for name, batch in cases().items():
        results = pipeline.generate(batch).results
        out[name] = torch.cat([r.images for r in results])
    return out


def main() -> None:
    from safetensors.torch import save_file

    from models.demo import load_demo_pipeline

    FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file(render(load_demo_pipeline()), str(FILE))
    print(f"wrote {FILE}")


if __name__ == "__main__":
    main()
