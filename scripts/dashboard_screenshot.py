"""Refresh the dashboard screenshots in docs/img/ (dashboard.png, dashboard-chat.png).

They come from a real run of the browser test (tests/dashboard/test_dashboard_browser.py): a DHT, two
nodes on a tiny random Llama, Debian's headless Chromium. The tiny model has random weights, so the
chat reply is gibberish; it is streamed by the real swarm all the same.

    python scripts/dashboard_screenshot.py [OUTPUT_DIR]      # default: docs/img
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    out = Path(argv[0]).resolve() if argv else ROOT / "docs" / "img"
    env = {**os.environ, "OPENHYDRA_DASHBOARD_SCREENSHOTS": str(out)}
    command = [sys.executable, "-m", "pytest", "tests/dashboard/test_dashboard_browser.py", "-q",
               "-p", "no:cacheprovider"]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code == 0:
        for name in ("dashboard.png", "dashboard-chat.png"):
            print(f"wrote {out / name}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
