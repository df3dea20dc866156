"""The playground (GET /, service/playground.py) in a real headless Chromium, against uvicorn on
the tiny pipeline: the form takes the model's defaults, Generate streams progress and previews and
shows the same image the API returns for that seed, "same seed again", Cancel, a 422 shown, a
narrow window, and with API keys on: the page loads without a key and asks for one after a 401.

A HeldPipeline holds the compute thread after a chosen step, so the test sees the page mid-run
without sleeps. The demo-model test also takes the README's screenshot: SAVE_SCREENSHOT=1 writes
it to docs/playground.png, otherwise to a temporary folder.

Chromium, chromedriver (Debian's, scripts/install_test_tools) and selenium (the dev extra) are
needed: missing ones skip the browser tests, and fail them under CI=true."""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.auth import AuthConfig
from tests.deploy.tooling import REPO, missing
from tests.service.conftest import WAIT_S, FaultyPipeline, LiveServer, serve, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"  # given explicitly: selenium-manager never downloads one
SCREENSHOT = REPO / "docs" / "playground.png"
KEY = "playground-test-key-0123"
ASSETS = ("/", "/playground/app.js", "/playground/style.css")


class HeldPipeline(FaultyPipeline):
    """The real pipeline; after ``hold(n)``, its n-th step from then on keeps the compute thread
    (that step's events not yet sent) until ``release()``."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__(pipeline)
        self.held, self.released = threading.Event(), threading.Event()
        self.steps_left: int | None = None

    def hold(self, after_steps: int) -> None:
        self.held.clear()
        self.released.clear()
        self.steps_left = after_steps

    def release(self) -> None:
        self.steps_left = None
        self.released.set()

    def step(self, states: Sequence[Any], *, previews: bool = False) -> list[Any]:
        events = super().step(states, previews=previews)
        if self.steps_left is not None:
            self.steps_left -= 1
            if self.steps_left == 0:
                self.held.set()
                assert self.released.wait(WAIT_S), "test never released the step"
        return events


@contextmanager
def serve_held(tiny_pipeline: Any) -> Iterator[tuple[LiveServer, HeldPipeline]]:
    held = HeldPipeline(tiny_pipeline)
    try:
        with serve(held) as live:
            yield live, held
    finally:
        held.release()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
    except ImportError:
        missing("the selenium package (pip install -e '.[dev]')")
    for program in (CHROMIUM, CHROMEDRIVER):
        if not os.access(program, os.X_OK):
            missing(f"`{program}`")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any) -> Any:
    browser.set_window_size(1000, 1000)
    return browser


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def until(driver: Any, condition: Any, what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition, what)


def open_page(driver: Any, live: LiveServer) -> None:
    """Load the page and wait until it has the model (and, once loaded, its defaults)."""
    driver.get(live.url + "/")
    until(driver, lambda d: by_id(d, "model").text.startswith("Model: "), "model shown")
    until(driver, lambda d: by_id(d, "width").get_property("value") != "", "defaults filled")


def fill(driver: Any, element_id: str, text: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def result_images(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results img")


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def shown_pixels(image: Any) -> np.ndarray:
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return pixels(src.split(",", 1)[1])


def test_generate_streams_progress_and_previews_then_shows_the_apis_image(
    page: Any, tiny_pipeline: Any
) -> None:
    from selenium.webdriver.common.by import By

    with serve_held(tiny_pipeline) as (live, held):
        open_page(page, live)
        defaults = tiny_pipeline.defaults
        assert by_id(page, "width").get_property("value") == str(defaults.width)
        assert by_id(page, "prior_steps").get_property("value") == str(defaults.prior_steps)
        assert by_id(page, "width").get_attribute("max") == str(tiny_pipeline.limits.max_size)
        assert by_id(page, "demo-notice").is_displayed()  # the tiny model calls itself a demo
        assert by_id(page, "prompt").get_property("value") == "a red circle on a blue background"
        fill(page, "prompt", "a green square")
        fill(page, "seed", "1234")

        held.hold(after_steps=4)  # Stage C steps 1-3 reported, the preview after step 2 sent
        by_id(page, "generate").click()
        wait_until(held.held.is_set, "the fourth step")
        until(page, lambda d: float(by_id(d, "progress").get_property("value")) > 0, "progress")
        until(
            page,
            lambda d: d.execute_script(
                "const img = document.querySelector('#previews img');"
                "return img !== null && img.complete && img.naturalWidth > 0;"
            ),
            "a preview",
        )
        assert "Stage C" in by_id(page, "status").text
        assert not by_id(page, "generate").is_enabled()
        assert by_id(page, "cancel").is_enabled()
        held.release()

        until(page, lambda d: len(result_images(d)) == 1, "the image")
        api = live.client.post("/v1/generate", json={"prompt": "a green square", "seed": 1234})
        assert api.status_code == 200, api.text
        assert np.array_equal(
            shown_pixels(result_images(page)[0]), pixels(api.json()["data"][0]["b64_json"])
        )
        assert float(by_id(page, "progress").get_property("value")) == 1
        assert by_id(page, "generate").is_enabled() and not by_id(page, "cancel").is_enabled()
        assert not page.find_elements(By.CSS_SELECTOR, "#previews img")
        link = page.find_element(By.CSS_SELECTOR, "#results a[download]")
        assert link.get_attribute("download") == "cascade-1234.png"
        assert link.get_attribute("href") == result_images(page)[0].get_attribute("src")

        fill(page, "seed", "")
        page.find_element(By.CSS_SELECTOR, "#results .same-seed").click()
        assert by_id(page, "seed").get_property("value") == "1234"


def test_cancel_stops_the_job_on_the_server(page: Any, tiny_pipeline: Any) -> None:
    with serve_held(tiny_pipeline) as (live, held):
        open_page(page, live)
        held.hold(after_steps=2)
        by_id(page, "generate").click()
        wait_until(held.held.is_set, "the second step")
        request_id = until(
            page, lambda d: by_id(d, "progress").get_attribute("data-request-id"), "request id"
        )
        by_id(page, "cancel").click()
        until(page, lambda d: by_id(d, "status").text == "Cancelled.", "cancelled")
        assert by_id(page, "generate").is_enabled() and not by_id(page, "cancel").is_enabled()
        assert not by_id(page, "error").is_displayed()
        held.release()
        state = live.client.get(f"/v1/requests/{request_id}").json()
        assert state["status"] == "cancelled", state
        assert not result_images(page)


def test_a_refused_request_shows_the_servers_message_and_marks_the_field(
    page: Any, tiny_pipeline: Any
) -> None:
    with serve(tiny_pipeline) as live:
        open_page(page, live)
        fill(page, "width", "100")  # not a multiple of 8: 422 before any stream
        by_id(page, "generate").click()
        error = until(
            page, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"), "error"
        )
        assert "invalid_field" in error.text and "width" in error.text
        assert by_id(page, "width").get_attribute("aria-invalid") == "true"
        assert by_id(page, "generate").is_enabled()


def test_the_page_fits_a_narrow_window(page: Any, tiny_pipeline: Any) -> None:
    with serve(tiny_pipeline) as live:
        page.set_window_size(360, 800)
        open_page(page, live)
        overflow = page.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        assert by_id(page, "generate").is_displayed()


def test_with_api_keys_the_page_loads_without_one_and_asks_for_it(
    page: Any, tiny_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_API_KEYS", KEY)
    with serve(tiny_pipeline) as live:
        for path in ASSETS:
            assert live.client.get(path).status_code == 200, path
        assert live.client.post("/v1/generate", json={"prompt": "x"}).status_code == 401

        open_page(page, live)
        schemes = live.client.get("/openapi.json").json()["components"].get("securitySchemes")
        if not schemes:  # nothing tells the page that keys are on until it is refused
            assert not by_id(page, "key-row").is_displayed()
        by_id(page, "generate").click()
        until(page, lambda d: by_id(d, "error").is_displayed(), "the 401")
        assert "missing API key" in by_id(page, "error").text
        assert by_id(page, "key-row").is_displayed()

        fill(page, "api-key", KEY)
        by_id(page, "generate").click()
        until(page, lambda d: len(result_images(d)) == 1, "the image")
        assert not by_id(page, "error").is_displayed()

        page.refresh()  # the key is remembered (localStorage) and the field shown with it
        until(page, lambda d: by_id(d, "key-row").is_displayed(), "key field")
        assert by_id(page, "api-key").get_property("value") == KEY


def test_the_demo_model_in_the_page(page: Any, tmp_path: Path) -> None:
    """A real picture of the demo model, shown with its notice; the README's screenshot."""
    from models.demo import load_demo_pipeline

    with serve(load_demo_pipeline()) as live:
        page.set_window_size(1000, 1100)
        open_page(page, live)
        assert by_id(page, "demo-notice").is_displayed()
        fill(page, "seed", "7")
        fill(page, "num_images", "2")
        by_id(page, "generate").click()
        until(page, lambda d: len(result_images(d)) == 2, "the images")
        until(
            page,
            lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')]"
                ".every((img) => img.complete && img.naturalWidth > 0)"
            ),
            "the images decoded",
        )
        assert not by_id(page, "warnings").is_displayed()  # the prompt is one it was trained on
        shot = tmp_path / "playground.png"
        assert page.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        if os.environ.get("SAVE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)


def test_the_schema_carries_the_models_defaults_the_form_starts_from(tiny_pipeline: Any) -> None:
    with serve(tiny_pipeline) as live:
        doc = live.client.get("/openapi.json").json()
    fields = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    defaults = tiny_pipeline.defaults
    for name in ("width", "height", "prior_steps", "prior_guidance_scale", "decoder_steps"):
        assert fields[name]["default"] == getattr(defaults, name), name


def test_with_keys_only_the_page_and_its_prefix_are_open() -> None:
    config = AuthConfig.from_keys([KEY])
    for path in ASSETS:
        assert not config.requires_key(path), path
    for path in ("/playground", "/playgroundx/app.js", "/v1/generate", "/index.html"):
        assert config.requires_key(path), path


def test_nothing_but_the_static_files_answers_under_the_prefix(
    tiny_pipeline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASCADE_API_KEYS", KEY)
    monkeypatch.setenv("CASCADE_METRICS_REQUIRE_KEY", "true")
    with serve(tiny_pipeline) as live:
        assert live.client.get("/metrics").status_code == 401
        # sent as written (an HTTP client would remove the dots): the path stays under the prefix
        for path in ("/playground/%2e%2e/metrics", "/playground/../metrics"):
            with socket.create_connection(("127.0.0.1", live.port), timeout=WAIT_S) as sock:
                sock.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
                )
                answer = b"".join(iter(lambda: sock.recv(65536), b"")).decode("latin-1")
            assert answer.startswith("HTTP/1.1 404 "), (path, answer[:300])
            assert "cascade_" not in answer


def test_the_static_files_ship_with_the_package() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["service"]
    shipped = {p for pattern in patterns for p in (REPO / "service").glob(pattern) if p.is_file()}
    static = {p for p in (REPO / "service" / "static").rglob("*") if p.is_file()}
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in static}
    assert static <= shipped, sorted(str(p) for p in static - shipped)
