"""Screenshot of the chat page (docs/chat_page.png): `jaxllm serve` on a checkpoint, headless Chromium, one message.

    python docs/screenshot.py --checkpoint runs/smollm2 --context-length 512 [--message TEXT] [--out PNG]

Needs Chromium, chromedriver (`make browser-deps`) and selenium (the dev extras). The server runs on a
free loopback port with a one-off API key, which the script types into the page as a user would.
The checkpoint needs a chat template for the chat page; without one the completion page is shot.
`--context-length N` serves a view of the checkpoint with a shorter context (its files linked, its
config.yaml rewritten): the server compiles every prompt length up to the context while warming up,
which for SmolLM2's 8192 takes many minutes and GBs on a CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1"]  # fmt: skip


def start_server(checkpoint: str, key: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", checkpoint, "--port", "0", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env={**os.environ, "JAXLLM_API_KEY": key})
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        sys.exit(f"the server printed no address: {line!r}")
    port = int(match.group(1))
    deadline = time.monotonic() + 900
    while True:  # GET /ready: 200 once the model has warmed up
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=10):
                return proc, port
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit("the server did not become ready")
            time.sleep(0.5)


def short_context(checkpoint: str, context_length: int, into: Path) -> str:
    """A directory like `checkpoint` (files linked) whose config.yaml says `context_length`."""
    import yaml

    src = Path(checkpoint).resolve()
    for item in src.iterdir():
        if item.name != "config.yaml":
            (into / item.name).symlink_to(item)
    config = yaml.safe_load((src / "config.yaml").read_text())
    config["model"]["context_length"] = min(context_length, config["model"]["context_length"])
    (into / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--context-length", type=int, help="serve the checkpoint with a shorter context")
    parser.add_argument("--message", default="Write a haiku about a small language model.")
    parser.add_argument("--system", default="", help="system prompt typed into the page")
    parser.add_argument("--temperature", default="0")
    parser.add_argument("--max-tokens", default="80")
    parser.add_argument("--out", default=str(Path(__file__).with_name("chat_page.png")))
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("serve_flags", nargs="*", help="after --: more flags for jaxllm serve")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    key = secrets.token_urlsafe(16)
    work = Path(tempfile.mkdtemp(prefix="jaxllm-screenshot-"))
    checkpoint = args.checkpoint
    if args.context_length:
        (work / "ck").mkdir()
        checkpoint = short_context(checkpoint, args.context_length, work / "ck")
    proc, port = start_server(checkpoint, key, ["--slots", "1", "--max-prefill-batch", "1", *args.serve_flags])
    profile = str(work / "chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in [*FLAGS, f"--window-size={args.width},{args.height}", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        mode = driver.execute_script("return document.body.dataset.mode")

        def fill(element_id: str, text: str) -> None:
            element = driver.find_element(By.ID, element_id)
            element.clear()
            element.send_keys(text)

        fill("key", key)
        fill("temperature", args.temperature)
        fill("max_tokens", args.max_tokens)
        if mode == "chat":
            if args.system:
                driver.find_element(By.TAG_NAME, "summary").click()
                fill("system", args.system)
            fill("message", args.message)
            driver.find_element(By.ID, "send").click()
            done = "!document.getElementById('send').disabled"
        else:
            fill("prompt", args.message)
            driver.find_element(By.ID, "go").click()
            done = "!document.getElementById('go').disabled"
        WebDriverWait(driver, 600, poll_frequency=0.2).until(lambda d: d.execute_script(f"return {done};"))
        error = driver.execute_script("return document.getElementById('error').textContent")
        if error:
            sys.exit(f"the page shows an error: {error}")
        driver.save_screenshot(args.out)
        print(f"{mode} page: wrote {args.out}")
    finally:
        driver.quit()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
