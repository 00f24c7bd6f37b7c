"""The HTML leaderboard in a real headless browser (Debian's chromium + chromedriver, driven by selenium): it loads
with no console errors, sorting and filtering work, and a screenshot is saved (results/test-artifacts/)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from scbench.cli import main

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)")
ARTIFACTS = Path(__file__).resolve().parents[2] / "results" / "test-artifacts"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from support import make_store

    tmp = tmp_path_factory.mktemp("browser")
    db = make_store(tmp / "s.sqlite")
    out = tmp / "board.html"
    main(["export", "--store", str(db), "--format", "html", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    yield d
    d.quit()


def column(driver, name):
    from selenium.webdriver.common.by import By

    heads = [th.text.strip(" \u25b2\u25bc") for th in driver.find_elements(By.CSS_SELECTOR, "#board thead th")]
    i = heads.index(name)
    return [r.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v")
            for r in driver.find_elements(By.CSS_SELECTOR, "#board tbody tr") if r.is_displayed()]


def test_page_loads_sorts_filters(page, driver):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(page.as_uri())
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    imgs = driver.find_elements(By.CSS_SELECTOR, ".figs img")
    assert len(imgs) == 3 and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in imgs)

    avg_head = [th for th in driver.find_elements(By.CSS_SELECTOR, "#board thead th") if th.text.strip() == "avg"][0]
    avg_head.click()
    up = [float(v) for v in column(driver, "avg")]
    assert up == sorted(up) and len(up) == 16
    avg_head.click()
    down = [float(v) for v in column(driver, "avg")]
    assert down == sorted(down, reverse=True)
    task_head = [th for th in driver.find_elements(By.CSS_SELECTOR, "#board thead th") if th.text.strip() == "task"][0]
    task_head.click()
    tasks = column(driver, "task")
    assert tasks == sorted(tasks)

    Select(driver.find_element(By.NAME, "category")).select_by_value("string_retrieval")
    assert set(column(driver, "category")) == {"string_retrieval"} and len(column(driver, "task")) == 8
    Select(driver.find_element(By.NAME, "stages")).select_by_value("compression")
    assert set(column(driver, "method")) == {"snapkv"} and len(column(driver, "task")) == 4
    Select(driver.find_element(By.NAME, "stages")).select_by_value("")
    Select(driver.find_element(By.NAME, "category")).select_by_value("")
    Select(driver.find_element(By.NAME, "mode")).select_by_value("multi_request")
    assert set(column(driver, "mode")) == {"multi_request"}
    Select(driver.find_element(By.NAME, "mode")).select_by_value("")
    assert driver.get_log("browser") == [] or all(e["level"] != "SEVERE" for e in driver.get_log("browser"))

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "leaderboard_test.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
