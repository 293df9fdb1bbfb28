"""The search page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dfsnet.store import ImageIndex
from dfsnet.web import create_app

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}); "
                    "`apt-get install chromium chromium-driver` (as .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _loaded_thumbnails(driver) -> list[int]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#results img')].map(i => i.complete ? i.naturalWidth : 0)")


def test_pick_an_image_and_see_result_thumbnails(browser, web_index, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query = web_index["images"] / "class_1" / "003.jpg"
    with live_server(create_app(ImageIndex.load(web_index["index"]))) as url:
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "12 images" in d.find_element(By.ID, "index-info").text)
        k_input = browser.find_element(By.ID, "k-input")
        k_input.clear()
        k_input.send_keys("6")
        browser.find_element(By.ID, "file-input").send_keys(str(query))
        wait.until(lambda d: len(_loaded_thumbnails(d)) == 6 and all(w > 0 for w in _loaded_thumbnails(d)))
        cards = browser.find_elements(By.CSS_SELECTOR, "#results li")
        assert cards[0].text.startswith("#1 · distance 0")
        assert any("class_1" in c.text and "003.jpg" in c.text for c in cards if "distance 0" in c.text)
        assert "6 results of 12" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "query-preview").get_attribute("naturalWidth") != "0"
        browser.save_screenshot(str(tmp_path / "results.png"))

        # A non-image named .jpg: the page shows the server's message and no results.
        fake = tmp_path / "fake.jpg"
        fake.write_text("this is not a picture")
        browser.find_element(By.ID, "file-input").send_keys(str(fake))
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "not an image of a supported type" in browser.find_element(By.ID, "error").text
        assert _loaded_thumbnails(browser) == []


def test_more_like_this_and_browsing_pages(browser, web_index, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with live_server(create_app(ImageIndex.load(web_index["index"]))) as url:
        browser.get(f"{url}/?page_size=5")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "12 images" in d.find_element(By.ID, "index-info").text)
        browser.find_element(By.ID, "file-input").send_keys(str(web_index["images"] / "class_2" / "000.jpg"))
        wait.until(lambda d: "results of 12" in d.find_element(By.ID, "status").text)
        # search by a result: no upload; the query is shown beside the results and leads them
        second = browser.find_elements(By.CSS_SELECTOR, "#results li")[1]
        target_id, target_name = second.get_attribute("data-id"), second.find_element(By.CLASS_NAME, "name").text
        second.find_element(By.CSS_SELECTOR, "button.similar").click()
        wait.until(lambda d: f"results like #{target_id}" in d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "results-heading").text == f"More like {target_name}"
        assert f"#{target_id}" in browser.find_element(By.ID, "query-caption").text
        first = browser.find_elements(By.CSS_SELECTOR, "#results li")[0]
        assert first.get_attribute("data-id") == target_id and "query" in first.get_attribute("class")
        assert "distance 0" in first.text and target_name in first.text
        wait.until(lambda d: d.execute_script("return document.getElementById('query-preview').naturalWidth") > 0)

        # browse the collection page by page, with the keyboard
        browse = browser.find_element(By.ID, "browse-button")
        browse.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "page-info").text == "page 1 of 3")
        ids = lambda: [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#results li")]  # noqa: E731
        assert ids() == ["0", "1", "2", "3", "4"]
        assert browser.find_element(By.ID, "prev-page").get_attribute("disabled") == "true"
        browser.find_element(By.ID, "next-page").send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "page-info").text == "page 2 of 3")
        assert ids() == ["5", "6", "7", "8", "9"]
        browser.find_element(By.ID, "next-page").click()
        wait.until(lambda d: d.find_element(By.ID, "page-info").text == "page 3 of 3")
        assert ids() == ["10", "11"] and browser.find_element(By.ID, "next-page").get_attribute("disabled") == "true"
        assert "images 11–12 of 12" in browser.find_element(By.ID, "status").text
        # a picture of the collection searches by it too
        browser.find_elements(By.CSS_SELECTOR, "#results button.similar")[0].send_keys(Keys.ENTER)
        wait.until(lambda d: "results like #10" in d.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "pager").is_displayed() is False
