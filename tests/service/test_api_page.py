"""The web page in a real browser: headless Chromium (Debian chromium + chromium-driver) via Selenium 4.

Keyboard only (Tab, Enter; the file chooser is the one thing Selenium fills by path): enter the key,
choose a pack radiograph, analyse, wait, read the verdict and the physician prompt; at phone width
(390 × 844, in Russian) and on a desktop (1280 × 800, in English). Screenshots go to
``runs/screenshots/`` (XSO_ARTIFACTS overrides), to be looked at.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from model_factory import make_models_dir

from contract.i18n import RLM, RTL
from diagnosis.messages import PHYSICIAN, gettext_for

from .api_harness import ApiProcess, create_key, pack_chest_film
from .conftest import worker_env
from .harness import ROOT, WorkerProcess

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("XSO_ARTIFACTS", ROOT / "runs" / "screenshots"))


@pytest.fixture(scope="module")
def served(fake_telegram, redis_db, tmp_path_factory, pack):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    folder = tmp_path_factory.mktemp("page")
    env = {**os.environ, **worker_env(fake_telegram.url, redis_db[0], make_models_dir(folder / "models")),
           "API_KEYS_FILE": str(folder / "keys.json")}
    key, _ = create_key(env, "clinic-page")
    worker = WorkerProcess(env, folder / "worker.log").start()
    api = ApiProcess(env, folder / "api.log").start()
    yield api, key, folder
    api.stop()
    worker.stop()


@pytest.fixture
def browser(served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, _, folder = served
    profile = folder / f"profile-{os.getpid()}"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--lang=en-US"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def tab(driver, times: int = 1) -> str:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(times):
        ActionChains(driver).send_keys(Keys.TAB).perform()
    return driver.switch_to.active_element.get_attribute("id") or driver.switch_to.active_element.get_attribute(
        "name")


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


@pytest.mark.parametrize(("width", "height", "language"), [(390, 844, "ru"), (1280, 800, "en"), (390, 844, "ar")])
def test_page_analyses_an_xray_with_the_keyboard_alone(served, browser, pack, width, height, language):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    api, key, _ = served
    browser.set_window_size(width, height)
    browser.get(api.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.visibility_of_element_located((By.ID, "key")))
    # Focus order: language, key, "use this key".
    assert tab(browser) == "language"
    if language != "en":
        Select(browser.find_element(By.ID, "language")).select_by_value(language)
        wait.until(lambda d: d.execute_script("return document.documentElement.lang") == language)
    assert browser.execute_script("return document.documentElement.dir") == ("rtl" if language in RTL else "ltr")
    assert tab(browser) == "key"
    press(browser, key + Keys.ENTER)
    wait.until(ec.visibility_of_element_located((By.ID, "upload-form")))
    assert browser.switch_to.active_element.get_attribute("id") == "image"
    assert browser.execute_script("return sessionStorage.getItem('xso-api-key')") == key
    assert browser.find_element(By.ID, "image").get_attribute("capture") == "environment"
    browser.find_element(By.ID, "image").send_keys(str(pack_chest_film(pack)))
    assert tab(browser) == "mode"  # the checked radio of the mode group
    assert tab(browser) == "submit"
    press(browser, Keys.ENTER)
    wait.until(ec.visibility_of_element_located((By.ID, "result")))
    verdict = browser.find_element(By.ID, "verdict").text
    physician = browser.find_element(By.ID, "physician").text
    # (Selenium's .text drops the RIGHT-TO-LEFT MARK that starts every line of a right-to-left text)
    assert verdict and gettext_for(language)(PHYSICIAN).replace(RLM, "") in physician
    assert browser.switch_to.active_element.get_attribute("id") == "result-heading"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlays img"))
    assert browser.execute_script("return document.querySelector('#overlays img').naturalWidth") > 0
    # Nothing wider than the window (readable without sideways scrolling at phone width).
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(width, max(height, browser.execute_script("return document.body.scrollHeight") + 140))
    browser.save_screenshot(str(ARTIFACTS / f"api-page-{width}x{height}-{language}.png"))
