"""Headless Chromium driven over the DevTools protocol through a pipe (--remote-debugging-pipe): no websocket,
no driver package, no network. Used by tests/test_explorer.py.

    with Browser() as browser:
        page = browser.open(path)          # waits for the load event
        page.evaluate("document.title")    # a JavaScript expression's value
        page.errors                        # console errors, uncaught exceptions, failed loads, as text

Chromium reads commands (JSON, each ended by a NUL byte) on its fd 3 and answers on fd 4.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--mute-audio", "--hide-scrollbars", "--remote-debugging-pipe",
)  # fmt: skip


def chromium() -> Optional[str]:
    """The browser's path, or None (Debian's package is `chromium`; setup.sh installs it where it can)."""
    return next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)


class Browser:
    def __init__(self, width: int = 1500, height: int = 1300, timeout: float = 60):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="spectra-chromium-")  # a fresh profile: nothing carried over
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()
        # Above 9, so that moving one end onto fd 3 or 4 cannot overwrite the other before it is moved.
        to_browser, from_browser = (self._above_nine(fd) for fd in (to_browser, from_browser))
        binary = chromium()
        if binary is None:
            raise RuntimeError("no chromium on PATH")
        # bash (dash refuses fd numbers above 9) puts the two pipe ends on fds 3 and 4, where Chromium reads.
        command = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        args = [*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(["bash", "-c", command, binary, *args], pass_fds=(to_browser, from_browser),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._next_id = 0
        self._replies: dict[int, queue.Queue] = {}
        self.events: list[dict] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def _above_nine(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def _read(self) -> None:
        buffer = b""
        with os.fdopen(self._answers, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                buffer += chunk
                *messages, buffer = buffer.split(b"\0")
                for raw in messages:
                    message = json.loads(raw)
                    with self._lock:
                        if "id" in message and message["id"] in self._replies:
                            self._replies[message["id"]].put(message)
                        else:
                            self.events.append(message)

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> dict:
        with self._lock:
            self._next_id += 1
            number = self._next_id
            reply: queue.Queue = queue.Queue()
            self._replies[number] = reply
        message = {"id": number, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        answer = reply.get(timeout=self.timeout)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def open(self, path: Path) -> "Page":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        started = time.perf_counter()
        page.send("Page.navigate", {"url": Path(path).resolve().as_uri()})
        page.wait_for("Page.loadEventFired")
        page.load_seconds = time.perf_counter() - started
        return page

    def close(self) -> None:
        try:
            os.close(self._commands)  # a closed pipe makes Chromium exit
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        self.load_seconds = float("nan")

    def send(self, method: str, params: Optional[dict] = None) -> dict:
        return self.browser.send(method, params, self.session)

    def own_events(self, method: str) -> list[dict]:
        with self.browser._lock:
            return [e for e in self.browser.events if e.get("sessionId") == self.session and e["method"] == method]

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if events := self.own_events(method):
                return events[0]["params"]
            time.sleep(0.02)
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still false after {timeout} s")
            time.sleep(0.05)

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and log errors (a failed load, a blocked request), as text."""
        found = [
            " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
            for e in self.own_events("Runtime.consoleAPICalled") if e["params"]["type"] in ("error", "assert")
        ]  # fmt: skip
        found += [e["params"]["exceptionDetails"].get("exception", {}).get("description", "exception")
                  for e in self.own_events("Runtime.exceptionThrown")]  # fmt: skip
        found += [e["params"]["entry"]["text"] for e in self.own_events("Log.entryAdded")
                  if e["params"]["entry"]["level"] == "error"]  # fmt: skip
        return found

    @property
    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.own_events("Network.requestWillBeSent")]

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def hover(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
