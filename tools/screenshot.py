"""A screenshot of the dashboard with a running fleet, for the README (docs/dashboard.png).

    python -m tools.screenshot [--output docs/dashboard.png] [--devices 24]
                               [--width 1400] [--height 1000] [--full-page]

An edge gateway (mqttd with the operations listener, bridged to an upstream mqttd), a device
fleet publishing to it, two workers in a consumer group, and an archiver with a persistent
session that stops after a few messages (so its queue grows while it is away); then the
dashboard in headless chromium (Debian's chromium and chromedriver, as the tests use), once
the clients table is full and the rates are moving. Every process it starts runs in its own
temporary directory and is ended by its PID at the end (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
START_TIMEOUT_S = 30.0
FILL_TIMEOUT_S = 60.0
MQTT_PORT = re.compile(r"mqttd listening on 127\.0\.0\.1:(\d+)")
ROOT = Path(__file__).resolve().parents[1]  # the processes run this tree's mqttd and devices
HTTP_PORT = re.compile(r"operations \(HTTP\) on http://127\.0\.0\.1:(\d+)/")

GATEWAY = """\
listeners:
  - host: 127.0.0.1
    port: 0
http:
  host: 127.0.0.1
  port: 0
persistence:
  data_dir: {data_dir}
monitoring:
  sys_interval_s: 1
bridges:
  - name: upstream
    host: 127.0.0.1
    port: {upstream_port}
    client_id: edge-17
    clean_session: false
    topics:
      - pattern: "site/+/telemetry"
        direction: out
        qos: 1
        remote_prefix: "edge-17/"
      - pattern: "site/+/command"
        direction: in
        qos: 1
        remote_prefix: "edge-17/"
"""


class Processes:
    """The processes this script started, each with its log file; ended by PID."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> Path:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
            )
        self.started.append(process)
        return log

    def end_all(self) -> None:
        for process in reversed(self.started):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        for process in reversed(self.started):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()


def wait_for_log(log: Path, pattern: re.Pattern[str]) -> int:
    """The port a process logs once it listens (the log file is polled: this is a tool)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        time.sleep(0.1)
    raise SystemExit(f"{log.name}: no {pattern.pattern!r} after {START_TIMEOUT_S} s:\n"
                     f"{log.read_text(errors='replace')}")


def start_fleet(processes: Processes, devices: int) -> int:
    """The upstream broker, the gateway and its clients; returns the dashboard's port."""
    upstream = processes.start("upstream", "-m", "mqttd", "--host", "127.0.0.1", "-p", "0",
                               "--data-dir", str(processes.directory / "upstream"))
    upstream_port = wait_for_log(upstream, MQTT_PORT)
    config = processes.directory / "gateway.yaml"
    config.write_text(GATEWAY.format(data_dir=processes.directory / "gateway",
                                     upstream_port=upstream_port))
    gateway = processes.start("gateway", "-m", "mqttd", "-c", str(config))
    port = str(wait_for_log(gateway, MQTT_PORT))
    http_port = wait_for_log(gateway, HTTP_PORT)
    processes.start("archiver", "-m", "devices", "consume", "-p", port, "--client-id",
                    "archiver", "--no-group", "--persistent", "--count", "20")
    for n in (1, 2):
        processes.start(f"worker-{n}", "-m", "devices", "consume", "-p", port,
                        "--client-id", f"worker-{n}", "--persistent")
    processes.start("fleet", "-m", "devices", "fleet", "-p", port, "--devices", str(devices),
                    "--interval", "0.5", "--qos", "1", "--persistent", "--seed", "7")
    return http_port


def screenshot(url: str, output: Path, size: tuple[int, int], devices: int, full: bool) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     f"--window-size={size[0]},{size[1]}", "--force-device-scale-factor=1",
                     f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(2 * size[0] - inner[0], 2 * size[1] - inner[1])  # the viewport
        driver.get(url)

        def filled(d: webdriver.Chrome) -> bool:
            """Every client listed, the archiver's queue growing, messages moving, the
            bridge up, the uptime known."""
            rows = d.find_elements(By.CSS_SELECTOR, "#clients tbody tr")
            queued = d.find_elements(By.CSS_SELECTOR, 'tr[data-client-id="archiver"] td.queued')
            bridge = d.find_elements(By.CSS_SELECTOR, "#bridges td.state")
            return (
                len(rows) >= devices + 3
                and bool(queued) and queued[0].text not in ("0", "")
                and d.find_element(By.ID, "t-in-rate").text not in ("\u2013", "0.0")
                and bool(bridge) and bridge[0].text == "connected"
                and "up" in d.find_element(By.ID, "uptime").text
            )

        wait = WebDriverWait(driver, FILL_TIMEOUT_S, poll_frequency=0.2)
        wait.until(filled)
        updated = driver.find_element(By.ID, "updated").text
        # one more poll: every client's rate has two samples
        wait.until(lambda d: d.find_element(By.ID, "updated").text != updated)
        if full:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(size[0], height)
        output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(output))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--devices", type=int, default=24)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--full-page", action="store_true", help="the whole page, not the window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mqttd-screenshot-") as directory:
        processes = Processes(Path(directory))
        try:
            http_port = start_fleet(processes, args.devices)
            screenshot(f"http://127.0.0.1:{http_port}/", args.output.resolve(),
                       (args.width, args.height), args.devices, args.full_page)
        finally:
            processes.end_all()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
