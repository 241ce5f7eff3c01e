"""The labeling page in a real headless Chromium: clicks and keys, a restart, escaping, two labelers.

Needs Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver) and
the `selenium` package; without them the tests are skipped, saying which is missing.
LMHP_WRITE_SCREENSHOT=1 also writes the page's screenshot to docs/label_app.png.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lm_human_preferences.labeling import collect, label_types
from lm_human_preferences.labeling.app import questions, web
from lm_human_preferences.labeling.app.queue import LabelQueue

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,760")

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

if webdriver is None:
    pytest.skip("the browser tests need the selenium package (pip install -e '.[test]')", allow_module_level=True)
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip("the browser tests need Chromium and its driver: apt-get install chromium chromium-driver",
                allow_module_level=True)

from test_label_app import load_for_training, new_queue  # noqa: E402  (after the skips: it imports torch)


@pytest.fixture
def browsers(tmp_path):
    """A factory of headless Chromium sessions, each with a fresh profile (its own cookies)."""
    drivers = []

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp_path / f'profile{len(drivers)}'}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


def console_errors(driver) -> list[str]:
    """Errors the page logged (failed loads, exceptions, refused content)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


class Page:
    """The labeling page in one browser, with waits for each new render."""

    def __init__(self, driver, url: str):
        self.driver = driver
        self.open(url)

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-renders"))

    def wait(self, condition):
        return WebDriverWait(self.driver, 10).until(condition)

    def renders(self) -> int:
        return int(self.driver.find_element(By.TAG_NAME, "body").get_attribute("data-renders") or 0)

    def question_id(self) -> int | None:
        value = self.driver.find_element(By.ID, "question").get_attribute("data-question-id")
        return int(value) if value else None

    def _after(self, action) -> None:
        before = self.renders()
        action()
        self.wait(lambda d: self.renders() > before)
        assert self.driver.find_element(By.ID, "message").text == ""

    def click_response(self, index: int) -> None:
        self._after(lambda: self.driver.find_element(By.CSS_SELECTOR, f"button.response[data-index='{index}']").click())

    def click(self, element_id: str) -> None:
        self._after(lambda: self.driver.find_element(By.ID, element_id).click())

    def key(self, key: str) -> None:
        self._after(lambda: ActionChains(self.driver).send_keys(key).perform())

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text


def serve(queue: LabelQueue, port: int = 0, page: web.Page | None = None) -> web.LabelServer:
    server = web.LabelServer(queue, page or web.Page("test: best_of_4", "Pick the best."), "127.0.0.1", port)
    server.start()
    return server


def stop(server: web.LabelServer) -> None:
    server.shutdown()
    server.server_close()
    server.queue.close()


def test_label_twenty_questions_with_clicks_and_keys_across_a_restart(tmp_path, browsers):
    out = tmp_path / "labels.json"
    server = serve(new_queue(out, n=24))
    port = server.server_address[1]
    page = Page(browsers(), server.url)
    answers: list[tuple[int, int]] = []  # (question id, label), in the order they were given

    def pick(i: int) -> None:
        qid, choice = page.question_id(), i % 4
        if i % 2:
            page.key(str(choice + 1))
        else:
            page.click_response(choice)
        answers.append((qid, choice))
        assert page.question_id() != qid

    for i in range(5):
        pick(i)
    skipped = page.question_id()
    page.key("s")
    assert page.question_id() != skipped
    pick(5)
    undone = answers.pop()
    page.key("u")
    assert page.question_id() == undone[0]
    pick(6)
    undone = answers.pop()
    page.click("undo")
    assert page.question_id() == undone[0]
    for i in range(7, 12):
        pick(i)
    assert "Labelled 10 of 24" in page.text("progress-text") and "skipped 1" in page.text("progress-text")

    stop(server)  # a restart on the same port: the page reloads and goes on
    server = serve(new_queue(out), port)
    page.open(server.url)
    done = {qid for qid, _ in answers} | {skipped}
    assert page.question_id() not in done
    assert "Labelled 10 of 24" in page.text("progress-text")
    for i in range(12, 22):
        pick(i)
        assert page.question_id() not in done
    stop(server)
    assert console_errors(page.driver) == []

    assert len(answers) == 20 and len({qid for qid, _ in answers}) == 20 and skipped not in dict(answers)
    _, items = questions.load(tmp_path / "labels.json.questions.json")
    labels = load_for_training(out)
    assert len(labels) == 20
    for row, (qid, label) in enumerate(answers):
        question = items[qid].question
        assert labels.columns["query"][row].tolist() == question.query
        assert [labels.columns[f"sample{k}"][row].tolist() for k in range(4)] == question.responses
        assert labels.columns["best"][row] == label


XSS_QUERY = "<script>window.pwned=1</script>"
XSS_RESPONSES = ['<img src=x onerror="window.pwned=2">', "<b>bold?</b> & &amp; 'quotes\"",
                 "line one\n  line two, indented", ""]


def test_texts_are_shown_as_text_and_no_script_runs(tmp_path, browsers):
    """Prepared questions with markup in their texts, served by `label.py serve --questions`."""
    prepared = tmp_path / "prepared.json"
    question = collect.Question([0, 1], [[2, 3, 4], [5, 6, 7], [8, 9, 10], [27, 27, 27]], XSS_QUERY, XSS_RESPONSES)
    item = questions.Item(question, [False, True, False, True])
    questions.save(prepared, label_types.get("best_of_4"), [item])
    out = tmp_path / "labels.json"
    process = subprocess.Popen([sys.executable, str(ROOT / "label.py"), "serve", "test", "--out", str(out),
                                "--questions", str(prepared), "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = [process.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("open "):
            lines.append(process.stdout.readline())
        assert lines[-1], "".join(lines)
        page = Page(browsers(), lines[-1].split()[1])
        driver = page.driver
        assert page.text("query") == XSS_QUERY
        shown = [e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, ".response .text")]
        assert shown == XSS_RESPONSES[:3] + ["(empty)"]
        marks = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".response .end")]
        assert marks == ["… cut off at the length limit", "■ ended here"] * 2
        assert driver.find_elements(By.TAG_NAME, "img") == [] and driver.find_elements(By.TAG_NAME, "b") == []
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
        assert driver.execute_script("return window.pwned") is None
        page.key("3")
        assert "All questions are answered" in page.text("waiting-text")
        assert driver.execute_script("return window.pwned") is None
        assert console_errors(driver) == []
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rest, _ = process.communicate(timeout=20)
        finally:
            process.kill()  # a server that did not stop must not outlive the test
    assert process.returncode == 0 and "stopped: labelled 1/1 questions" in rest, rest
    assert json.loads(out.read_text()) == [collect.record(question, 2)]


def test_two_labelers_on_overlapping_questions(tmp_path, browsers):
    out = tmp_path / "labels.json"
    server = serve(new_queue(out, n=4, overlap=1.0))
    first, second = Page(browsers(), server.url), Page(browsers(), server.url)
    picks = {first: [0, 1, 2, 3], second: [0, 1, 0, 3]}  # they agree on 3 of 4
    for i in range(4):
        for page in (first, second):
            assert page.question_id() == i
            if page is first:
                page.click_response(picks[page][i])
            else:
                page.key(str(picks[page][i] + 1))
    for page in (first, second):
        page.open(server.url)
        assert page.question_id() is None
        text = page.text("agreement")
        assert text.startswith("Agreement: 75% (3 of 4 questions labelled twice") and "by chance 25%, kappa 0.67" in text
        you = "labeler 1 (you) 75% of 4, labeler 2 75% of 4" if page is first else \
            "labeler 1 75% of 4, labeler 2 (you) 75% of 4"
        assert text.endswith(f"Per labeler: {you}"), text
    assert server.queue.agreement()["rate"] == 0.75
    stop(server)
    assert console_errors(first.driver) == console_errors(second.driver) == []
    assert load_for_training(out).columns["best"].tolist() == picks[first]
    assert load_for_training(out.with_name("labels.json.overlap.json")).columns["best"].tolist() == picks[second]


def test_kjv_page_and_its_screenshot(tmp_path, browsers):
    """The demo's page: best of 4 of the kjv model's samples for mock_descriptiveness."""
    queue = new_queue(tmp_path / "labels.json", n=3, experiment="mock_descriptiveness")
    text = web.instructions("mock_descriptiveness", "mock:descriptiveness", label_types.get("best_of_4"))
    server = serve(queue, page=web.Page("mock_descriptiveness: best_of_4", text))
    page = Page(browsers(), server.url)
    try:
        assert page.text("instructions") == text
        cards = page.driver.find_elements(By.CSS_SELECTOR, "button.response")
        assert [c.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent") for c in cards] == \
            queue.items[0].question.response_texts
        page.key("2")
        assert page.question_id() == 1 and "Labelled 1 of 3" in page.text("progress-text")
        target = ROOT / "docs" / "label_app.png" if os.environ.get("LMHP_WRITE_SCREENSHOT") == "1" \
            else tmp_path / "label_app.png"
        target.parent.mkdir(exist_ok=True)
        assert page.driver.save_screenshot(str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page.key("u")
        assert page.question_id() == 0
        assert console_errors(page.driver) == []
    finally:
        stop(server)
