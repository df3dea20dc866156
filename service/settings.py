"""Runtime settings: one typed ``Settings`` read from ``CASCADE_*`` environment variables.

Built once in ``__main__`` (or by a test) and passed inward; nothing else reads the environment. A
bad value raises ``SettingsError`` naming the variable, the value and what is allowed, and start-up
stops there. The most used settings also have a command-line flag (``FLAGS``); a flag wins over its
variable.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "CASCADE_"
# Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS, 89.5 MP), the most
# CASCADE_MAX_IMAGE_PIXELS may allow; a constant here so reading the settings imports no Pillow.
PILLOW_MAX_IMAGE_PIXELS = 89_478_485
# Read by other modules (service/auth.py, service/access_log.py) or by the deployment files themselves.
OTHER_VARIABLES = frozenset(
    {
        "CASCADE_API_KEYS",
        "CASCADE_API_KEYS_FILE",
        "CASCADE_LOG_PROMPTS",
        "CASCADE_METRICS_REQUIRE_KEY",
        "CASCADE_WEIGHTS_HOST_DIR",
    }
)
# Settings with a flag of `python -m service` / `cascade-serve` (field -> flag); the rest are
# variables only. Equivalent to CASCADE_<FIELD>; given both, the flag wins.
FLAGS = {
    "host": "--host",
    "port": "--port",
    "weights_dir": "--weights",
    "prior_variant": "--prior-variant",
    "decoder_variant": "--decoder-variant",
    "device": "--device",
    "dtype": "--dtype",
    "log_level": "--log-level",
    "torch_threads": "--torch-threads",
}
logger = logging.getLogger("service.settings")


class SettingsError(ValueError):
    """A ``CASCADE_*`` variable has a value the service cannot start with."""


class Settings(BaseModel):
    """Every runtime knob of one server process (one process per GPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Interface to listen on; 0.0.0.0 in a container.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    weights_dir: Path | None = Field(
        None,
        description="Hugging Face snapshot directory of Stable Cascade. Unset: the built-in demo "
        "model, a tiny Stable Cascade trained on pictures of coloured shapes (runs on any CPU).",
    )
    prior_variant: Literal["lite", "big"] = Field(
        "lite", description="Stage C size: lite (1B) or big (3.6B)."
    )
    decoder_variant: Literal["lite", "big"] = Field(
        "lite", description="Stage B size: lite (700M) or big (1.5B)."
    )
    device: str = Field(
        "auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Weight dtype; auto is bfloat16 on CUDA and float32 on CPU."
    )
    cuda_graphs: bool = Field(
        True,
        description="On a GPU, replay Stage B/C forwards as CUDA graphs (one per batch shape, "
        "up to 4 per stage, each keeping its activation memory). No effect on the CPU.",
    )

    max_queue_size: int = Field(
        32, ge=1, description="Jobs that may wait for the GPU; beyond it requests get 503 at once."
    )
    max_batch_images: int = Field(
        4,
        ge=1,
        le=256,
        description="Most images in one batch (also the most images of one request).",
    )
    max_batch_wait_ms: float = Field(
        2.0,
        ge=0,
        le=10_000,
        description="Static batching: how long the oldest job waits for compatible company.",
    )
    batching: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: jobs join and leave the running batch at every denoising step; "
        "static: a batch of compatible requests runs to its end before the next one starts.",
    )
    stage_overlap: bool = Field(
        False,
        description="Continuous batching: run a Stage C step and a Stage B step at the same time "
        "(two compute threads; on CUDA two streams), so that jobs in one stage do not wait for "
        "the other's forwards. For GPUs; on a CPU the two forwards share the same cores.",
    )
    max_active_images: int = Field(
        16,
        ge=1,
        le=4096,
        description="Continuous batching: most images admitted at once (each keeps its latents "
        "and text conditioning on the device); at least CASCADE_MAX_BATCH_IMAGES.",
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Deadline from arrival to batch start; a request may only shorten it.",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long queued and running jobs get to finish."
    )
    retry_after_s: int = Field(5, ge=0, description="Retry-After seconds sent with every 503.")
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        le=3600,
        description="Seconds an idle keep-alive connection stays open; keep it above the idle "
        "timeout of the clients and proxies in front (nginx upstream: 60 s, httpx: 5 s).",
    )
    max_body_bytes: int = Field(
        65_536, ge=1024, description="Largest request body accepted (413 above), chunked or not."
    )
    max_image_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest input image file (image-to-image, variation; 413 above), on the "
        "routes that take one. The rest of such a request stays within CASCADE_MAX_BODY_BYTES; "
        "base64 in JSON makes the image 4/3 larger, which the body limit of that route allows.",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        le=PILLOW_MAX_IMAGE_PIXELS,
        description="Most pixels (width x height) of an input image, read from its header before "
        "decoding, so a small file declaring a huge picture is refused without being decoded. At "
        "most Pillow's own decompression-bomb threshold. A queued image request holds its decoded "
        "picture (3 bytes a pixel: 50 MB at the default), so this times CASCADE_MAX_QUEUE_SIZE "
        "bounds that memory.",
    )
    max_prompt_chars: int = Field(
        2000,
        ge=1,
        description="Longest prompt in characters (the text encoder truncates at 77 tokens).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads torch uses inside one operation (torch.set_num_threads). Unset: "
        "one less than the CPUs this process may use (at least 1), so that a shared machine does "
        "not stall generations; see docs/bench_threads.md.",
    )
    encode_threads: int = Field(
        2, ge=1, le=64, description="Threads encoding PNGs off the event loop."
    )
    png_metadata: bool = Field(
        True,
        description="Write each PNG's generation parameters (prompt, negative prompt, steps, "
        "guidance, seed, size, model) into a 'parameters' text chunk, as other image tools do.",
    )
    cors_origins: tuple[str, ...] = Field(
        (),
        description="Comma-separated origins (scheme://host[:port]) whose web pages may call the "
        "API, or * for any. Unset: no CORS headers, so browsers refuse cross-origin calls.",
    )

    @model_validator(mode="after")
    def _check_overlap(self) -> Settings:
        if self.stage_overlap and self.batching == "static":
            raise ValueError(
                "CASCADE_STAGE_OVERLAP needs CASCADE_BATCHING=continuous (a static batch is in "
                "one stage at a time)"
            )
        return self

    @model_validator(mode="after")
    def _check_active_images(self) -> Settings:
        if self.max_active_images < self.max_batch_images:
            raise ValueError(
                f"CASCADE_MAX_ACTIVE_IMAGES={self.max_active_images} must be at least "
                f"CASCADE_MAX_BATCH_IMAGES={self.max_batch_images}"
            )
        return self

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_cors_origins(cls, value: object) -> object:
        return value.split(",") if isinstance(value, str) else value  # the variable's form

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        origins = tuple(item.strip().lower() for item in value if item.strip())
        for origin in origins:
            _check_origin(origin)
        if "*" in origins and len(origins) > 1:
            raise ValueError("* allows every origin: give it alone, or list the origins")
        return origins

    @field_validator("weights_dir")
    @classmethod
    def _check_weights_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(
                f"{value} is not a directory; point it at a folder of downloaded weights, or "
                "unset it to serve the built-in demo model"
            )
        return value

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, flags: Mapping[str, str] | None = None
    ) -> Settings:
        """Read ``CASCADE_<FIELD>`` variables (empty ones count as unset), then ``flags`` (field ->
        raw value from the command line), which win over the variables; raise SettingsError on
        bad values."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        from_flag: set[str] = set()
        for key, raw in environ.items():
            if not key.startswith(ENV_PREFIX) or raw == "" or key in OTHER_VARIABLES:
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name in cls.model_fields:
                values[name] = raw
            else:
                # Deployments may set variables for other tools; a typo is worth a warning, not
                # a crash.
                logger.warning(
                    "ignoring unknown setting %s (known: %s)", key, ", ".join(env_names())
                )
        for name, raw in (flags or {}).items():
            if name not in FLAGS:
                raise ValueError(f"{name} has no command-line flag")
            values[name] = raw
            from_flag.add(name)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                if not err["loc"]:  # a rule across settings: its message names them
                    problems.append(str(err["msg"]).removeprefix("Value error, "))
                    continue
                name = str(err["loc"][0])
                shown = values.get(name, "")
                if name in from_flag:
                    label = f"{FLAGS[name]}={shown!r} (or {ENV_PREFIX}{name.upper()})"
                elif name in FLAGS:
                    label = f"{ENV_PREFIX}{name.upper()}={shown!r} (or {FLAGS[name]})"
                else:
                    label = f"{ENV_PREFIX}{name.upper()}={shown!r}"
                problems.append(f"{label}: {err['msg']}")
            raise SettingsError("invalid settings: " + "; ".join(problems)) from None


_ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])"
    r"(:(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _check_origin(origin: str) -> None:
    """An origin as a browser sends it in ``Origin``: scheme://host[:port], lower case, nothing
    after the port, no default port (browsers leave it out, so it would never match)."""
    if origin == "*":
        return
    match = _ORIGIN.fullmatch(origin)
    if match is None:
        hint = "; drop the path" if re.match(r"[a-z][a-z0-9+.-]*://[^/]+/", origin) else ""
        raise ValueError(
            f"{origin!r} is not an origin: each must be scheme://host[:port] (e.g. "
            f"https://app.example.com or http://localhost:3000) or *{hint}"
        )
    port = match.group("port")
    if port is not None and not 1 <= int(port) <= 65535:
        raise ValueError(f"{origin!r}: the port must be 1..65535")
    if port is not None and _DEFAULT_PORTS.get(match.group("scheme")) == port:
        default = origin.rsplit(":", 1)[0]
        raise ValueError(
            f"{origin!r}: browsers send the origin without its default port; write {default!r}"
        )


def env_names() -> list[str]:
    """All ``CASCADE_*`` variable names, in declaration order."""
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields]


def setting_name(field: str) -> str:
    """How messages name a setting: ``CASCADE_PORT (--port)``, or the variable alone."""
    variable = ENV_PREFIX + field.upper()
    return f"{variable} ({FLAGS[field]})" if field in FLAGS else variable
