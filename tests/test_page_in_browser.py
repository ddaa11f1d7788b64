"""The upload page (web/static/index.html) in a real headless Chromium against a real stack.

A real broker, the session's Milvus, one worker process per role (web, chunker, embedder,
indexer, the hashing backend). The browser opens the page the web role serves, uploads a
PDF through the page's file input, follows the document's row until it reads completed
(the page has no polling: after the upload's own re-list only the live WebSocket changes
the row), searches through the page's form for a sentence of that document and sees it
come back first. A screenshot of that state is kept at SCREENSHOT for a person to look at.

The browser is Debian's `chromium` with its `chromium-driver`, driven by Selenium through
an explicit Service path: Selenium Manager never runs, nothing is downloaded. Chromium gets
no network but loopback: host names do not resolve and every other address goes to a proxy
that does not exist.
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.local import documents
from pipeline.local.workers import WorkerStack, worker_env

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_PACKAGES = "chromium chromium-driver"
SCREENSHOT = Path(__file__).resolve().parent.parent / "artifacts" / "page-completed-and-search.png"
WINDOW = (1280, 1000)
COMPLETED_TIMEOUT = 120.0

# Words no page of the lorem vocabulary uses, so only the chunk that holds them matches all
# their words and bigrams (the hashing backend's features).
MARKER = (
    "Zephyrine oboists catalogued seventeen saffron kayaks beside the Quillmoor lighthouse "
    "while vermilion herons audited the marzipan ledger"
)


@pytest.fixture(scope="module")
def stack(milvus_settings, tmp_path_factory):
    logs = tmp_path_factory.mktemp("browser-worker-logs")
    workers = WorkerStack(milvus_settings, worker_env(milvus_settings), logs)
    try:
        workers.launch({"web": 1, "chunker": 1, "embedder": 1, "indexer": 1})
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chromium"))
    try:
        yield driver
    finally:
        driver.quit()


def headless_chromium(workdir: Path) -> webdriver.Chrome:
    """Headless Chromium through the system chromedriver; fails (never skips) without them."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} missing: the browser test needs Debian's packages {APT_PACKAGES} "
            f"(apt-get install --no-install-recommends {APT_PACKAGES}; .ci/run installs them)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers' /dev/shm is often 64 MB, too small for the renderer
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        # Nothing outside loopback: no update checks, no field trials, no safe browsing lookups...
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--no-first-run",
        "--no-default-browser-check",
        "--metrics-recording-only",
        "--no-pings",
        # ...and if anything still tries: no name resolves, and other addresses go to a dead proxy
        # (loopback always bypasses a proxy).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=127.0.0.1:9",
        f"--user-data-dir={workdir / 'profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(str(CHROMEDRIVER), log_output=str(workdir / "chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def browser_state(driver) -> str:
    """What a failure message shows: the page's visible text and its console."""
    try:
        console = "\n".join(entry["message"] for entry in driver.get_log("browser"))
        text = driver.find_element(By.TAG_NAME, "body").text
    except Exception as error:  # the browser itself may be what failed
        return f"(browser state unavailable: {error!r})"
    return f"page text:\n{text}\nconsole:\n{console or '(empty)'}"


def wait_for(driver, condition, timeout: float, what: str):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"{what} within {timeout:.0f} s\n{browser_state(driver)}") from None


def flat(text: str) -> str:
    """Text with its line breaks and runs of spaces as single spaces (a PDF wraps lines)."""
    return re.sub(r"\s+", " ", text).strip()


def test_a_file_uploaded_through_the_page_completes_and_is_found_by_search(stack, browser, tmp_path):
    company = f"browser-{uuid.uuid4().hex[:8]}"
    filename = f"harbour-{uuid.uuid4().hex[:8]}.pdf"
    pages = documents.lorem_pages(n_pages=3, words_per_page=110, seed=16)
    middle = pages[1].split(". ")
    pages[1] = ". ".join(middle[:2] + [MARKER] + middle[2:])
    upload = tmp_path / filename
    upload.write_bytes(documents.make_pdf(pages))

    web = stack.of_role("web")[0]
    browser.get(f"{web.url}/")
    assert browser.title == "docflow"
    live = browser.find_element(By.ID, "live")
    # Auth is off on this stack: the page names its company, and connects once it is changed.
    company_input = browser.find_element(By.ID, "company")
    company_input.clear()
    company_input.send_keys(company, Keys.TAB)
    wait_for(browser, lambda d: live.get_attribute("data-state") == "open", 30, "the live socket did not open")

    # Every state the document's row shows, in order, recorded in the page as the DOM changes.
    browser.execute_script(
        """
        const filename = arguments[0];
        window.statesShown = [];
        new MutationObserver(() => {
          const row = [...document.querySelectorAll("#documents tr")]
            .find(tr => tr.children[1].textContent === filename);
          const shown = window.statesShown;
          if (row && shown[shown.length - 1] !== row.dataset.state) shown.push(row.dataset.state);
        }).observe(document.getElementById("documents"), {childList: true, subtree: true});
        """,
        filename,
    )
    browser.find_element(By.ID, "files").send_keys(str(upload))
    browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    wait_for(
        browser,
        lambda d: d.find_element(By.ID, "message").text == f"{filename}: uploaded",
        30,
        "the page did not say the file was uploaded",
    )

    row_xpath = f"//tbody[@id='documents']/tr[td[2]='{filename}']"

    def completed_row(driver):
        rows = driver.find_elements(By.XPATH, row_xpath)
        return rows[0] if rows and rows[0].get_attribute("data-state") == "completed" else False

    row = wait_for(browser, completed_row, COMPLETED_TIMEOUT, f"{filename}'s row did not read completed")
    cells = row.find_elements(By.TAG_NAME, "td")
    assert cells[2].text == "completed"
    assert "completed" in cells[2].get_attribute("class").split()  # shown in the completed colour
    assert cells[4].text == ""  # no error
    # Every chunk embedded and searchable, the bar full.
    progress = re.fullmatch(r"(\d+)/(\d+), (\d+) searchable", cells[3].text)
    assert progress and len(set(progress.groups())) == 1, cells[3].text
    bar = cells[3].find_element(By.TAG_NAME, "progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == progress.group(1)
    states = browser.execute_script("return window.statesShown;")
    # Had the upload's own re-list already read completed, nothing would show the socket worked.
    assert states[-1] == "completed" and len(states) > 1, f"states the row showed: {states}"
    assert live.get_attribute("data-state") == "open"

    query = browser.find_element(By.ID, "query")
    query.send_keys(MARKER)
    browser.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
    results = wait_for(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results li"), 30, "the page showed no search results"
    )
    assert re.fullmatch(rf"{len(results)} chunks in [\d.]+ ms", browser.find_element(By.ID, "search-message").text)
    sources = [result.find_element(By.CLASS_NAME, "source").text for result in results]
    texts = [flat(result.find_element(By.CLASS_NAME, "text").text) for result in results]
    # Only this company's chunks: every result is from the uploaded file; its sentence's chunk first.
    assert all(source.startswith(f"{filename}, page ") for source in sources), sources
    assert MARKER in texts[0], texts[0]
    assert sources[0].startswith(f"{filename}, page 2 "), sources[0]

    # A script error or a refused request the page still got past is a fault of the page too.
    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors

    SCREENSHOT.parent.mkdir(exist_ok=True)
    # The whole page, not only the window: the results run below the fold.
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {SCREENSHOT} (the row showed: {' → '.join(states)})")
    assert SCREENSHOT.stat().st_size > 10_000
