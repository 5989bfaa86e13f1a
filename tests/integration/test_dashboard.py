"""The dashboard at ``/`` in a real browser (Debian's chromium, headless, through selenium
and chromedriver): it shows a client's queue depth, lists retained messages (escaped),
pages and filters clients, shows the API's refusal without the token and kicks the client
with it; the browser's console stays free of errors. The broker runs in this process; every
blocking selenium call runs in a worker thread so that it keeps serving. Chromium missing
is a failure, not a skip: CI installs it (.ci/run).
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import trio

from mqttd.broker import Broker, running
from mqttd.config import Http
from tests.conftest import make_config
from tests.rawclient import RawClient

os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a browser or driver

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TIMEOUT_S = 90.0  # the whole test
WAIT_S = 20.0  # one thing the page must show (it polls every 2 s)
PAGE = 50  # clients per page in the dashboard
TO = "\u2013"  # the pager's en dash: "1\u201350 of 60"


def start_chromium(width: int = 1400, height: int = 1000) -> webdriver.Chrome:
    """Headless chromium with its console log kept (goog:loggingPrefs); a fresh profile."""
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.access(path, os.X_OK), f"no {path}: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp()}",
        "--no-first-run", "--disable-background-networking", "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


async def in_browser(function: Callable[..., Any], *args: Any) -> Any:
    """Run blocking selenium calls in a thread: the broker (this thread) keeps serving."""
    return await trio.to_thread.run_sync(function, *args)


def dashboard_url(broker: Broker) -> str:
    host, port = broker.http_addresses[0]
    return f"http://{host}:{port}/"


def text_of(driver: webdriver.Chrome, selector: str) -> str | None:
    elements = driver.find_elements(By.CSS_SELECTOR, selector)
    return elements[0].text if elements else None


def wait_for_text(driver: webdriver.Chrome, selector: str, expected: str) -> None:
    """Poll until the element ``selector`` shows ``expected`` (fails after WAIT_S)."""
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: text_of(d, selector) == expected,
        f"{selector} never showed {expected!r} (last: {text_of(driver, selector)!r})",
    )


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The browser console's errors since the last call."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def click_and_confirm(driver: webdriver.Chrome, selector: str, asked: str) -> None:
    driver.find_element(By.CSS_SELECTOR, selector).click()
    alert = WebDriverWait(driver, WAIT_S).until(expected_conditions.alert_is_present())
    assert asked in alert.text, alert.text
    alert.accept()


def kick_from_the_page(driver: webdriver.Chrome, url: str, token: str) -> list[dict[str, Any]]:
    """Load the page, check what it shows, kick ``device-1`` without then with the token;
    returns the console's errors."""
    console_errors(driver)  # drop what earlier tests left
    driver.get(url)
    row = 'tr[data-client-id="device-1"]'
    wait_for_text(driver, f"{row} td.queued", "2")  # window of 1: one inflight, two queued
    assert text_of(driver, f"{row} td.inflight") == "1"
    assert text_of(driver, f"{row} td.state") == "connected"
    assert text_of(driver, f"{row} td.protocol") == "3.1.1"
    assert text_of(driver, f"{row} td.address").startswith("127.0.0.1:")  # type: ignore[union-attr]
    wait_for_text(driver, "#t-queued", "2")
    assert text_of(driver, "#t-connections") == "2"
    assert (text_of(driver, "#version") or "").startswith("mqttd version ")
    # the retained browser, data shown as text
    wait_for_text(driver, 'tr[data-topic="status/device-1"] td.payload', "online")
    assert text_of(driver, 'tr[data-topic="note/html"] td.payload') == "<b>not bold</b>"
    assert not driver.find_elements(By.CSS_SELECTOR, "#retained b")
    wait_for_text(driver, 'tr[data-topic="raw/bytes"] td.payload', "base64 /wA=")

    # no token: the API's refusal is shown, nothing happens
    click_and_confirm(driver, f"{row} button.kick", 'Disconnect client "device-1"?')
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: "401" in (text_of(d, "#message") or ""), "the 401 was never shown"
    )
    assert "credential" in (text_of(driver, "#message") or "")
    refusals = console_errors(driver)  # chromium logs the 401 response itself: that one only
    assert all(
        "/api/v1/clients/device-1" in e["message"] and "401" in e["message"] for e in refusals
    ), refusals
    assert text_of(driver, f"{row} td.state") == "connected"

    driver.find_element(By.ID, "token").send_keys(token)
    click_and_confirm(driver, f"{row} button.kick", 'Disconnect client "device-1"?')
    wait_for_text(driver, f"{row} td.state", "disconnected")
    assert text_of(driver, "#message") == 'Client "device-1" disconnected.'
    assert not driver.find_element(By.CSS_SELECTOR, f"{row} button.kick").is_displayed()
    assert text_of(driver, f"{row} td.queued") == "2"  # the session stays, with its queue
    return console_errors(driver)


def delete_from_the_page(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """Delete a retained message, then the session of ``device-1``: their rows go."""
    row = 'tr[data-client-id="device-1"]'
    retained = 'tr[data-topic="note/html"]'
    click_and_confirm(driver, f"{retained} button.delete-retained", '"note/html"?')
    wait_for_text(driver, "#message", 'Retained message on "note/html" deleted.')
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, retained), "the retained row stayed"
    )
    click_and_confirm(driver, f"{row} button.delete-session", 'session of "device-1"')
    wait_for_text(driver, "#message", 'Session "device-1" deleted.')
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: not d.find_elements(By.CSS_SELECTOR, row), "the client's row stayed"
    )
    return console_errors(driver)


async def test_the_dashboard_shows_queue_depth_kicks_and_deletes(browser) -> None:
    """A persistent 3.1.1 client with a window of one that reads nothing: one message
    inflight, two queued, shown in its row; retained messages listed (markup shown as
    text, binary as base64); kick refused without the token (the 401 shown), done with it
    after the confirmation (the broker agrees: not connected; the session and its queue
    stay); then a retained message and the session deleted from the page. No errors in
    the console but that 401."""
    config = attrs.evolve(make_config(max_inflight_messages=1), http=Http(port=0))
    async with running(config) as broker:
        with trio.fail_after(TIMEOUT_S):
            device, _ = await RawClient.connected(broker.port, "device-1", clean_session=False,
                                                  keepalive_s=0)
            await device.subscribe("cmd/#", qos=1)
            backend, _ = await RawClient.connected(broker.port, "backend", keepalive_s=0)
            for n in range(3):
                await backend.publish("cmd/device-1", b"%d" % n, qos=1)
            await backend.publish("status/device-1", b"online", qos=1, retain=True)
            await backend.publish("note/html", b"<b>not bold</b>", qos=1, retain=True)
            await backend.publish("raw/bytes", b"\xff\x00", qos=0, retain=True)
            stats = broker.client_stats("device-1")
            assert stats is not None and (stats["inflight"], stats["queued"]) == (1, 2)
            assert broker.ops is not None

            errors = await in_browser(
                kick_from_the_page, browser, dashboard_url(broker), broker.ops.token
            )
            assert errors == []
            stats = broker.client_stats("device-1")
            assert stats is not None and not stats["connected"] and stats["queued"] == 2
            await device.expect_closed()  # its first message, then the end

            assert await in_browser(delete_from_the_page, browser) == []
            assert broker.client_stats("device-1") is None
            assert sorted(t for t, _ in broker.retained.items() if not t.startswith("$")) == [
                "raw/bytes", "status/device-1"
            ]
            await backend.aclose()


def page_and_filter(driver: webdriver.Chrome, url: str) -> list[dict[str, Any]]:
    console_errors(driver)
    driver.get(url)
    wait_for_text(driver, "#client-range", f"1{TO}{PAGE} of 60")
    rows = driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr")
    assert [r.get_attribute("data-client-id") for r in rows] == [
        f"sensor-{n:02}" for n in range(PAGE)
    ]
    assert not driver.find_element(By.ID, "client-next").get_attribute("disabled")
    driver.find_element(By.ID, "client-next").click()
    wait_for_text(driver, "#client-range", f"{PAGE + 1}{TO}60 of 60")
    assert driver.find_element(By.ID, "client-next").get_attribute("disabled")
    assert text_of(driver, "#clients tbody tr:last-child td.client_id") == "sensor-59"
    # a plain word matches anywhere in the id; wildcards as fnmatch; paging starts again
    driver.find_element(By.ID, "client-filter").send_keys("-4")
    wait_for_text(driver, "#client-range", f"1{TO}10 of 10")
    filter_box = driver.find_element(By.ID, "client-filter")
    filter_box.clear()
    filter_box.send_keys("sensor-?7")
    wait_for_text(driver, "#client-range", f"1{TO}6 of 6")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr")) == 6
    filter_box.clear()
    filter_box.send_keys("nobody")
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: d.find_element(By.ID, "clients-empty").is_displayed()
    )
    assert not driver.find_elements(By.CSS_SELECTOR, "#clients tbody tr")
    return console_errors(driver)


async def test_the_clients_table_pages_and_filters(browser) -> None:
    async with running(attrs.evolve(make_config(), http=Http(port=0))) as broker:
        with trio.fail_after(TIMEOUT_S):
            sensors = [
                (await RawClient.connected(broker.port, f"sensor-{n:02}", keepalive_s=0))[0]
                for n in range(60)
            ]
            assert await in_browser(page_and_filter, browser, dashboard_url(broker)) == []
            for sensor in sensors:
                await sensor.aclose()


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_the_dashboard_files_their_headers_and_the_credential() -> None:
    """/ and /index.html, the script, the style sheet and the icon, with a content security
    policy of this origin only, nosniff and no framing; nothing the page loads is from
    elsewhere. Where reading needs the credential (a listener off loopback), the page's
    files do not (they hold no data), the API still does."""
    async with running(attrs.evolve(make_config(), http=Http(port=0))) as broker:
        with trio.fail_after(TIMEOUT_S):
            url = dashboard_url(broker)
            for path, content_type in (
                ("", "text/html; charset=utf-8"), ("index.html", "text/html; charset=utf-8"),
                ("dashboard.js", "text/javascript; charset=utf-8"),
                ("dashboard.css", "text/css; charset=utf-8"), ("favicon.svg", "image/svg+xml"),
            ):
                status, headers, body = await trio.to_thread.run_sync(fetch, url + path)
                assert (status, headers["content-type"]) == (200, content_type), path
                assert headers["content-security-policy"].startswith("default-src 'self';")
                assert "'unsafe-inline'" not in headers["content-security-policy"]
                assert headers["x-content-type-options"] == "nosniff"
                assert headers["x-frame-options"] == "DENY"
                links = body.replace(b"http://www.w3.org/2000/svg", b"")  # a name, not a link
                assert b"http://" not in links and b"https://" not in links, path
                assert b"innerHTML" not in body and b"outerHTML" not in body, path
            status, headers, _ = await trio.to_thread.run_sync(fetch, url + "api/v1/stats")
            assert status == 200 and "content-security-policy" not in headers  # JSON unchanged

            assert broker.ops is not None
            broker.ops.open_reads = False  # as on a listener off loopback
            assert (await trio.to_thread.run_sync(fetch, url))[0] == 200
            status, _, body = await trio.to_thread.run_sync(fetch, url + "api/v1/stats")
            assert status == 401 and "credential" in json.loads(body)["error"]
