"""TensorBoard in a real browser: a tiny run's `tb/` folder served by `tensorboard`, opened in headless Chromium.

The Time Series dashboard is filtered to the `throughput/` and `accuracy/` tags the way a person would (typing in
"Filter tags"), and the test waits until their cards are on the page with values in their data tables, then keeps
a screenshot in the test's tmp folder. Driven by selenium + chromedriver; without selenium (or chromedriver) it
falls back to `chromium --dump-dom` / `--screenshot` plus TensorBoard's HTTP API. Without Chromium it skips and
says why (CI installs `chromium chromium-driver` with apt-get and tolerates failure).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_tiny_data, tiny_config_text

pytestmark = pytest.mark.slow

WANTED = ("throughput/tokens_per_s", "throughput/examples_per_s", "accuracy/valid", "accuracy/train_batch")
TAG_FILTER = "^(throughput|accuracy)/"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1800",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def browser_binary() -> str:
    binary = chromium()
    if binary is None:
        reason = "Chromium is not installed (apt-get install chromium chromium-driver): browser test skipped"
        print(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, browser_binary) -> Path:
    root = tmp_path_factory.mktemp("tb-browser")
    files = make_tiny_data(root / "data")
    config = root / "run.toml"
    # 10 steps logged every 2: throughput appears once the 3 warm-up steps are past
    config.write_text(
        tiny_config_text(
            files,
            root / "run",
            train={"epochs": 2, "batch_size": 64, "threads": 1},
            metrics={"log_every_steps": 2, "progress": False, "projector_words": 0},
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env | {"TRAINER_CACHE_DIR": str(root / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list((root / "run" / "tb").glob("events.out.tfevents.*"))
    return root / "run"


@pytest.fixture(scope="module")
def tensorboard_url(run_dir, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("tb-server") / "tensorboard.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run_dir / "tb"),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # serving, and the event files are loaded
            assert proc.poll() is None, f"tensorboard exited with {proc.returncode}; see {log.name}"
            try:
                tags = get_json(f"{url}/data/plugin/scalars/tags")
                if all(t in tags.get(".", {}) for t in WANTED):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"tensorboard never served the tags; see {log.name}"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def selenium_driver(binary: str, profile: Path):
    """A headless Chromium under selenium, or None when selenium or chromedriver is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not os.access(driver_path, os.X_OK):
        return None
    options = Options()
    options.binary_location = binary
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def visible_cards(driver) -> dict[str, str]:
    """Scalar cards on the page that are displayed: tag -> the card's text."""
    from selenium.webdriver.common.by import By

    cards = {}
    for card in driver.find_elements(By.CSS_SELECTOR, "scalar-card"):
        try:
            if not card.is_displayed():
                continue
            text = card.text
        except Exception:  # noqa: BLE001 - Angular re-renders cards; a stale element is retried next poll
            continue
        title = "".join(text.splitlines()[:2])  # the title is rendered as "throughput" + "/tokens_per_s"
        cards[title] = text
    return cards


def test_scalars_dashboard_shows_throughput_and_accuracy(tensorboard_url, browser_binary, tmp_path):
    screenshot = tmp_path / "tensorboard.png"
    driver = selenium_driver(browser_binary, tmp_path / "profile")
    if driver is None:
        return check_without_selenium(tensorboard_url, browser_binary, tmp_path, screenshot)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(f"{tensorboard_url}/#timeseries")
        tag_filter = WebDriverWait(driver, 90).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder*='tags']")
        )
        tag_filter.send_keys(TAG_FILTER)
        tag_filter.send_keys(Keys.ESCAPE)  # close the autocomplete list, which would cover the cards

        def ready(d) -> dict[str, str] | None:
            cards = visible_cards(d)
            # every wanted card is shown, with its data table filled (the run's value rows hold digits)
            if all(
                tag in cards and any(ch.isdigit() for ch in cards[tag].split("Relative", 1)[-1])
                for tag in WANTED
            ):
                return cards
            return None

        try:
            cards = WebDriverWait(driver, 90, poll_frequency=0.5).until(ready)
        except Exception:
            driver.save_screenshot(str(screenshot))
            raise AssertionError(
                f"cards never showed up: {sorted(visible_cards(driver))}; see {screenshot}"
            ) from None
        assert "Tags matching filter" in driver.find_element(By.TAG_NAME, "body").text
        time.sleep(1.0)  # let the charts finish their first draw
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    print(f"cards: {sorted(cards)}\nscreenshot: {screenshot}")
    assert screenshot.stat().st_size > 20_000 and screenshot.read_bytes().startswith(b"\x89PNG")


def check_without_selenium(url: str, binary: str, tmp_path: Path, screenshot: Path) -> None:
    """The HTTP API lists the tags; Chromium renders the filtered dashboard into a DOM dump and a screenshot."""
    print(
        "selenium or chromedriver unavailable: checking with chromium --dump-dom/--screenshot + the HTTP API"
    )
    tags = get_json(f"{url}/data/plugin/scalars/tags")["."]
    assert all(t in tags for t in WANTED), sorted(tags)
    page = f"{url}/?tagFilter={urllib.request.quote(TAG_FILTER)}#timeseries"
    base = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert "Tags matching filter" in dom and "throughput" in dom and "accuracy" in dom
    subprocess.run([*base, f"--screenshot={screenshot}", page], capture_output=True, timeout=120)
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 20_000 and screenshot.read_bytes().startswith(b"\x89PNG")
