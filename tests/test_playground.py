"""The playground page in a real browser (Debian's Chromium, driven through ChromeDriver by Selenium): a prompt is
typed, the answer streams in with each token coloured by its source, and the page shows the privacy policy, the
adapter and the audit records of that very request."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fedlm.cloud.service import background_app
from fedlm.egress.audit import AuditLog
from fedlm.fusion.decoder import FusionConfig, fuse_once
from fedlm.fusion.rules import make_rule
from fedlm.models import LoadedModel
from fedlm.privacy import EgressGate
from fedlm.serve.app import Gateway, create_gateway_app

PROMPT = "The capital of France"
CONFIG = FusionConfig(max_tokens=12)


@pytest.fixture
def browser(chromium: tuple[str, str], tmp_path: Path) -> Iterator[webdriver.Chrome]:
    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def test_the_playground_streams_a_coloured_answer_with_its_audit(
    browser: webdriver.Chrome, tiny_llama: LoadedModel, tiny_url: str, tmp_path: Path
) -> None:
    expected = fuse_once(tiny_llama, make_rule("router"), PROMPT, CONFIG, tiny_url)
    with EgressGate("off", audit=AuditLog(tmp_path / "audit.jsonl")) as gate:
        app = create_gateway_app(Gateway(tiny_llama, make_rule("router"), CONFIG, tiny_url, gate))
        with background_app(app, "fedlm serve") as url:
            browser.get(url.removesuffix("/v1") + "/")
            prompt = browser.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(PROMPT)
            browser.find_element(By.ID, "max-tokens").clear()
            browser.find_element(By.ID, "max-tokens").send_keys(str(CONFIG.max_tokens))
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").text == "done")
            spans = browser.find_elements(By.CSS_SELECTOR, "#answer span.tok")
            audit_rows = browser.find_elements(By.CSS_SELECTOR, "#audit tr")
            calls = int(browser.find_element(By.ID, "calls").text)
            policy = browser.find_element(By.ID, "policy").text
        records = gate.audit.records()
    assert "".join(span.get_attribute("textContent") for span in spans) == expected.text
    colours = {span.get_attribute("class").split()[-1] for span in spans}
    assert colours <= {"edge", "fused", "cloud"} and colours & {"fused", "cloud"}  # the cloud took part
    assert policy == "off" and calls > 0
    # one row per request that left, each the log's own record
    assert len(audit_rows) == calls == len(records)
    assert [row.find_elements(By.TAG_NAME, "td")[5].text for row in audit_rows] == [r.sha256[:16] for r in records]
