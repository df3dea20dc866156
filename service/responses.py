"""Between HTTP and the pipeline: a GenerateRequest becomes validated GenerationParams (or a 422
naming the field and limit) plus the warnings the model has about it, and a finished job becomes a
JSON or raw PNG response."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import Response

from models.demo_vocabulary import grammar_for_model
from models.request import MAX_SEED, GenerationParams, InvalidParams
from service.engine import Engine
from service.errors import InvalidRequest
from service.image_requests import ImageInput, output_size
from service.jobs import JobResult
from service.schemas import GenerateRequest, GenerateResponse, ImageData, Timings
from service.settings import Settings

# Request fields that fall back to the model's sampling defaults when left out (shifts and cfg_rho
# are not exposed: they always come from the model).
OPTIONAL_SAMPLING = (
    "width",
    "height",
    "prior_steps",
    "prior_guidance_scale",
    "decoder_steps",
    "decoder_guidance_scale",
)

T = TypeVar("T")

if TYPE_CHECKING:  # images are torch tensors; only engine.py and imaging.py import torch
    import torch


def wants_png(response_format: str | None, accept: str) -> bool:
    """An explicit response_format wins; otherwise whichever of image/png and application/json the
    Accept header names first (JSON when it names neither)."""
    if response_format is not None:
        return response_format == "png"
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in ("image/png", "application/json"):
            return media == "image/png"
    return False


def build_params(
    body: GenerateRequest,
    engine: Engine,
    settings: Settings,
    raw_png: bool,
    image: ImageInput | None = None,
) -> GenerationParams:
    """Fill omitted fields from the model's defaults (with an image, its size), pick a seed, and
    run every check; InvalidRequest (422)."""
    check_num_images(body.num_images, settings)
    if raw_png and body.num_images > 1:
        raise InvalidRequest(
            "a raw image/png response holds one image: ask for num_images=1, or "
            "response_format=b64_json (and Accept: application/json) to get several",
            field="num_images",
        )
    given = {name: getattr(body, name) for name in OPTIONAL_SAMPLING}
    if image is not None:
        given["width"], given["height"] = output_size(
            engine.limits, image.image.size, body.width, body.height
        )
    return validated_params(
        engine,
        settings,
        # an image variation's empty caption is "" (spec §7.8), whatever blanks were sent
        prompt=body.prompt if body.prompt.strip() else "",
        negative_prompt=body.negative_prompt,
        num_images=body.num_images,
        seed=body.seed,
        sampling=given,
        image=image,
    )


def check_num_images(num_images: int, settings: Settings, name: str = "num_images") -> None:
    """The server's cap on images per request; InvalidRequest naming ``name``."""
    if num_images > settings.max_batch_images:
        raise InvalidRequest(
            f"{name}={num_images} is over the limit of {settings.max_batch_images} "
            "images per request (the server's CASCADE_MAX_BATCH_IMAGES setting, which also caps "
            "a batch: the operator may raise it if the GPU memory allows)",
            field=name,
        )


def validated_params(
    engine: Engine,
    settings: Settings,
    *,
    prompt: str,
    negative_prompt: str,
    num_images: int,
    seed: int | None,
    sampling: Mapping[str, int | float | None],
    names: Mapping[str, str] | None = None,
    image: ImageInput | None = None,
) -> GenerationParams:
    """The checks every generation route applies, in one place: images per request, the seed
    range, prompt lengths, then the model's defaults for the ``sampling`` fields left None and
    ``pipeline.validate`` (which also checks ``image``'s strength and that the model can use an
    image). Raises InvalidRequest (the route chooses its status).

    ``names`` renames our fields for a route whose request calls them otherwise (the OpenAI
    route: num_images -> n, width / height -> size); messages and ``field`` use those names.
    """
    names = names or {}
    count = names.get("num_images", "num_images")
    check_num_images(num_images, settings, count)
    if seed is None:  # random, but every image's seed (seed + i) stays a seed the API accepts
        seed = secrets.randbelow(MAX_SEED - num_images + 2)
    elif seed + num_images - 1 > MAX_SEED:
        raise InvalidRequest(
            f"seed + {count} - 1 must be <= {MAX_SEED} (image i uses seed + i); "
            f"got seed={seed} with {count}={num_images}",
            field="seed",
        )
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > settings.max_prompt_chars:
            raise InvalidRequest(
                f"{name} is {len(text)} characters; the limit is {settings.max_prompt_chars} "
                "(the server's CASCADE_MAX_PROMPT_CHARS setting)",
                field=name,
            )
    given = {name: value for name, value in sampling.items() if value is not None}
    params = GenerationParams.from_defaults(
        engine.defaults,
        prompt,
        negative_prompt=negative_prompt,
        num_images=num_images,
        seed=seed,
        **given,
        **(image.fields() if image is not None else {}),
    )
    try:
        engine.validate(params)
    except InvalidParams as exc:
        name = names.get(exc.field, exc.field)
        # "width: must be ..." here; "size: width must be ..." where width is part of size
        what = (
            f"{name}: {exc.message}" if name == exc.field else f"{name}: {exc.field} {exc.message}"
        )
        raise InvalidRequest(what, field=name) from None
    return params


def prompt_warnings(params: GenerationParams, model_info: dict[str, str | bool]) -> list[str]:
    """What the loaded model cannot honour in this request, for a person: today the demo model's
    warnings about a prompt or negative prompt outside what it was trained on. Real weights: [].
    An empty prompt (an image variation's caption) is not checked."""
    grammar = grammar_for_model(model_info)
    if grammar is None or not params.prompt:
        return []
    return grammar.check(
        params.prompt, params.negative_prompt, real_weights="real weights (CASCADE_WEIGHTS_DIR)"
    )


def warning_header(warnings: list[str]) -> dict[str, str]:
    """``X-Cascade-Warning`` carrying every warning on one ASCII line (none: no header). Warnings
    quote a prompt's words, so anything outside printable ASCII is escaped (\\xe9, \\u2019)."""
    if not warnings:
        return {}
    text = " ".join(warnings).encode("ascii", "backslashreplace").decode("ascii")
    return {"X-Cascade-Warning": "".join(c if " " <= c <= "~" else " " for c in text)}


async def encode_each(
    run: Callable[..., Awaitable[T]],
    encode: Callable[[torch.Tensor, str | None], T],
    images: torch.Tensor,
    parameters: Sequence[str | None] | None = None,
) -> tuple[list[T], float]:
    """Encode every image of ``images`` [n, 3, H, W] in parallel through ``run`` (the encode pool),
    image i with ``parameters[i]`` (its PNG text, ``imaging.png_parameters_of``; None: none);
    returns the results in order and the wall seconds the request spent on them."""
    texts = [None] * len(images) if parameters is None else parameters
    started = time.perf_counter()
    results = await asyncio.gather(
        *(run(encode, image, text) for image, text in zip(images, texts, strict=True))
    )
    return list(results), time.perf_counter() - started


def timings_of(done: JobResult, encode: float, received_at: float) -> Timings:
    t = done.timings
    return Timings(
        queue_wait=done.queue_wait,
        first_step=done.first_step,
        text=t.text,
        prior=t.prior,
        decoder=t.decoder,
        vqgan=t.vqgan,
        encode=encode,
        total=time.monotonic() - received_at,
    )


def response_body(
    done: JobResult,
    b64_images: list[str],
    timings: Timings,
    model: dict[str, str | bool],
    request_id: str,
    warnings: list[str],
    params: GenerationParams,
) -> dict[str, Any]:
    """The GenerateResponse of a finished job, as a dict (the JSON body, and the data of a
    stream's result event)."""
    images = done.result.images  # uint8 [n, 3, H, W]
    body = GenerateResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        data=[
            ImageData(b64_json=b, seed=s)
            for b, s in zip(b64_images, done.result.seeds, strict=True)
        ],
        seed=done.result.seeds[0],
        width=int(images.shape[-1]),
        height=int(images.shape[-2]),
        batch_images=done.batch_images,
        prompt_truncated=done.result.prompt_truncated,
        negative_prompt_truncated=done.result.negative_prompt_truncated,
        warnings=warnings,
        timings=timings,
        **image_echo(params),
    )
    return body.model_dump()


def image_echo(params: GenerationParams) -> dict[str, Any]:
    """The effective strength and image_variation of a request with an image (None without)."""
    if params.image is None:
        return {"strength": None, "image_variation": None}
    return {"strength": params.strength, "image_variation": params.image_variation}


def png_response(
    done: JobResult,
    png: bytes,
    timings: Timings,
    model: dict[str, str | bool],
    warnings: list[str],
    params: GenerationParams,
) -> Response:
    server_timing = ", ".join(
        f"{name};dur={getattr(timings, name) * 1000:.1f}"
        for name in (
            "queue_wait",
            "first_step",
            "text",
            "prior",
            "decoder",
            "vqgan",
            "encode",
            "total",
        )
    )
    headers = {
        "X-Seed": str(done.result.seeds[0]),
        "X-Prompt-Truncated": str(done.result.prompt_truncated).lower(),
        "X-Negative-Prompt-Truncated": str(done.result.negative_prompt_truncated).lower(),
        "X-Batch-Images": str(done.batch_images),
        "X-Model": str(model.get("name", "")),
        "X-Demo-Weights": str(bool(model.get("demo", False))).lower(),
        "Server-Timing": server_timing,
        **warning_header(warnings),
    }
    if params.image is not None:
        headers["X-Strength"] = str(params.strength)
        headers["X-Image-Variation"] = str(params.image_variation).lower()
    return Response(content=png, media_type="image/png", headers=headers)
