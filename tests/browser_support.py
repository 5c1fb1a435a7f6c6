"""Headless Chromium for browser tests (Debian ``chromium`` + ``chromium-driver``, Selenium).

Use it from a test module::

    from browser_support import browser, console_errors, wait_until  # noqa: F401

    def test_page(browser: WebDriver) -> None:
        browser.get(url)
        wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "svg"), 20, "a chart")
        assert console_errors(browser) == []

Every browser gets a fresh profile in the test's temp directory and no network
services of its own (no sync, updates or background requests), so a test sees only
the requests its page makes. The browser console is captured (``goog:loggingPrefs``):
``console_errors`` returns the SEVERE entries, which include uncaught exceptions and
failed resource loads. Tests are skipped, naming the reason, only when the binaries are
missing; ``.ci/run`` installs them so CI never skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--window-size=1400,1000",
)


def chromium_binaries() -> tuple[str, str] | None:
    """``(chromium, chromedriver)``: ``RECSYS_CHROMIUM``/``RECSYS_CHROMEDRIVER``, else the
    Debian paths, else the PATH."""
    browser = (
        os.environ.get("RECSYS_CHROMIUM")
        or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    driver = (
        os.environ.get("RECSYS_CHROMEDRIVER")
        or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
        or shutil.which("chromedriver")
    )
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    """A headless Chromium driven by chromedriver; quit (browser and driver) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    found = chromium_binaries()
    if found is None:
        raise RuntimeError("chromium and chromedriver are not installed")
    browser, driver_path = found
    profile_dir.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(profile_dir / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium (``selenium.webdriver.Chrome``) for one test."""
    if chromium_binaries() is None:
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    with chromium(tmp_path / "chromium") as driver:
        yield driver


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """SEVERE browser console entries since the last call (reading the log drains it)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]


def wait_until(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    """The first truthy value of ``condition(driver)``; fails naming ``what`` and the
    console errors seen so far, which usually say why."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        errors = [e.get("message") for e in console_errors(driver)]
        raise AssertionError(
            f"timed out after {timeout:g}s waiting for {what}; console errors: {errors}"
        ) from None
