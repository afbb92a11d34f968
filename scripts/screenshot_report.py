"""Render a build's report.html to a PNG with a headless Chromium.

    python scripts/screenshot_report.py out/smoke/local/report.html report.png [--width 1280]

The browser is ``$EDGEBUILD_CHROMIUM`` or the first of ``chromium-headless-shell``, ``chromium``,
``chromium-browser``, ``google-chrome`` on the PATH (Debian: ``apt install chromium-headless-shell``).
The window is made tall, then the empty page background below the content is cropped off.
Exit codes: 0 written, 1 no browser found, 2 the browser failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The path of a headless-capable Chromium, or None."""
    env = os.environ.get("EDGEBUILD_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_command(browser: str, html: Path, png: Path, width: int, height: int) -> list:
    """The command line that screenshots ``html`` into ``png`` at ``width`` × ``height``."""
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--default-background-color=ffffffff", f"--window-size={width},{height}",
           f"--screenshot={png}", html.resolve().as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")        # Chromium refuses to run as root with its sandbox
    return cmd


def crop_background(png: Path) -> tuple:
    """Crop the uniform background below the page's content in place; return the new size."""
    from PIL import Image, ImageChops
    with Image.open(png) as im:
        rgb = im.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).getbbox()
    if box:
        rgb = rgb.crop((0, 0, rgb.width, min(rgb.height, box[3] + 24)))
    rgb.save(png, optimize=True)
    return rgb.size


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 10000, timeout: float = 120) -> tuple:
    """Write a PNG of ``html``; return its (width, height). Raises RuntimeError when it cannot."""
    browser = find_browser()
    if browser is None:
        raise LookupError("no headless Chromium found: apt install chromium-headless-shell, or set EDGEBUILD_CHROMIUM")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = browser_command(browser, Path(html), png, width, height) + [f"--user-data-dir={profile}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"{Path(browser).name} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return crop_background(png)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report.html to render")
    parser.add_argument("png", type=Path, help="where to write the PNG")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--max-height", type=int, default=10000, help="tallest page kept (pixels)")
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: no report at {args.html} (run `edgebuild report --html` first)", file=sys.stderr)
        return 2
    try:
        w, h = screenshot(args.html, args.png, args.width, args.max_height)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.png} ({w}×{h})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
