"""Responsiveness of the ``repo_mlx.viewer`` page at long inputs, in headless Chromium.

Writes the static page (``--html``'s) for random positions of the released 1B's
shape (11 RePo layers x 16 heads) over --tokens tokens, opens it in Debian's
chromium through selenium, and times in the browser (performance.now, up to
the next painted frame): the first plot after the page is opened, switching
head, switching layer, the focused/global toggle, clicking a point, and the
two small-multiple views. Each action is timed --repeats times; the median is
reported. The positions are random because the page's cost does not depend on
where they come from; the page is the one the viewer serves.

    python bench/bench_viewer.py                    # 4096 tokens
    python bench/bench_viewer.py --tokens 1024 --repeats 5
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from repo_mlx import viewer

ACTION = """
const [id, value, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const t = performance.now();
let p;
if (id === "pick") p = window.viewer.pick(value);
else { document.getElementById(id).value = value; p = window.viewer.draw(); }
p.then(() => requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t))));
"""


def page_for(tokens: int, layers=range(5, 16), heads=16, seed=0) -> str:
    rng = np.random.default_rng(seed)
    # A drift plus noise, with a few far outliers, like trained heads.
    z = {}
    for l in layers:
        walk = np.cumsum(rng.normal(0.5, 2.0, (1, heads, tokens)), axis=-1)
        walk[rng.random(walk.shape) < 0.01] += rng.normal(0, 500, 1)
        z[l] = walk.astype(np.float32)
    words = [f" w{i % 97}" for i in range(tokens)]
    start = time.perf_counter()
    data = viewer.page_data(z, words, total=tokens, limit=tokens, model="random 1B-shaped positions")
    html = viewer.page(data)
    print(f"page data for {len(z)} layers x {heads} heads x {tokens} tokens: "
          f"{time.perf_counter() - start:.2f} s in Python, page {len(html.encode()) / 1e6:.1f} MB")
    return html


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="Tokens of the text (default: 4096).")
    p.add_argument("--repeats", type=int, default=9, help="Timings per action; the median is reported (default: 9).")
    args = p.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1150",
              "--host-resolver-rules=MAP * ~NOTFOUND"]:
        options.add_argument(a)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    browser.set_script_timeout(300)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "page.html"
            path.write_text(page_for(args.tokens), encoding="utf-8")
            opened = []
            for _ in range(3):
                browser.get(path.as_uri())
                opened.append(browser.execute_async_script(
                    "window.viewer.ready.then(() => requestAnimationFrame(() => arguments[0](performance.now())))"))
            print(f"open the page to the first plot: {statistics.median(opened):.0f} ms "
                  f"(parsing plotly.js and the data included)")

            def timed(name, steps):
                times = [browser.execute_async_script(ACTION, *steps[k % len(steps)]) for k in range(args.repeats)]
                print(f"{name}: {statistics.median(times):.0f} ms (min {min(times):.0f}, max {max(times):.0f})")

            n = args.tokens
            timed("switch head", [("head", h) for h in (1, 2, 3, 4)])
            timed("switch layer", [("layer", l) for l in (6, 7, 8, 9)])
            timed("focused/global toggle", [("range", "global"), ("range", "focused")])
            timed("click a point", [("pick", i) for i in (n // 5, n // 2, 4 * n // 5)])
            timed("all 16 heads of a layer", [("view", "heads"), ("head", 0)])
            browser.execute_async_script(ACTION, "view", "one")
            timed("one head across the 11 layers", [("view", "layers"), ("head", 1)])
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
