"""repo_mlx.viewer in a real headless Chromium (Debian's chromium and chromedriver), offline.

The browser may resolve no name but 127.0.0.1, and the page's CSP lets it fetch
nothing but its own server. Screenshots of each state go to a pytest temporary
folder, or to $VIEWER_SCREENSHOTS when that is set.
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import repo_mlx
from repo_mlx import viewer
import synthetic
from repo_mlx.errors import LoadError
from repo_mlx.positions import inlier_range, outliers, positions, summary, token_texts
from repo_mlx import set_position_blend

pytest.importorskip("plotly", reason="the viewer needs plotly: pip install '.[viewer]'")
pytest.importorskip("selenium", reason="the browser tests drive Chromium with selenium: pip install '.[test]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "repo-olmo2-tiny"
TEXT = "The grass is green. The sky is blue. Here we go."
LONG = "The grass is green. The sky is blue. The sun is yellow. Here we go again, and again."
MAX_TOKENS = 40  # the served viewer's --max-tokens: LONG is cut, TEXT is not
MAX_BYTES = 2000  # the served viewer's --max-request-bytes
LOW, HIGH = (69, 117, 180), (215, 48, 39)  # the ends of the page's colour scale
TIMEOUT = 60


def find_browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI installs them: missing there is a broken setup, not a skip
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    chromium, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in [
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1280,1150",
        # Offline: no name resolves but the test server's address.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
    ]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_script_timeout(TIMEOUT)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = os.environ.get("VIEWER_SCREENSHOTS")
    folder = Path(folder) if folder else tmp_path_factory.mktemp("viewer-screenshots")
    folder.mkdir(parents=True, exist_ok=True)

    def shot(browser, name):
        browser.save_screenshot(str(folder / f"{name}.png"))

    return shot


def model_shortcut() -> Path:
    """A scratch folder where tests/fixtures/repo-olmo2-tiny leads to the fixture.

    Not the checkout itself: there ``python -m repo_mlx`` would import the
    checkout's repo_mlx/ folder instead of the installed package.
    """
    link = Path("tests/fixtures/repo-olmo2-tiny")  # the session's scratch folder (conftest)
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(FIXTURE)
    return Path.cwd()


def start_viewer(*flags) -> tuple:
    """A viewer process on a free port of 127.0.0.1; (process, base URL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "repo_mlx.viewer", "--model", "tests/fixtures/repo-olmo2-tiny", "--port", "0", *flags],
        cwd=model_shortcut(),  # the page shows the model as given: no path of this machine in the screenshots
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(TIMEOUT, proc.kill)  # a viewer that never starts fails the test
    watchdog.start()
    try:
        for line in proc.stdout:
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/)", line):
                return proc, m.group(1)
        raise AssertionError(f"the viewer exited with {proc.wait()} before serving")
    finally:
        watchdog.cancel()


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server():
    proc, url = start_viewer("--max-tokens", str(MAX_TOKENS), "--max-request-bytes", str(MAX_BYTES))
    yield url
    stop(proc)


def z_of(model, tokenizer, text, blend=None):
    ids = tokenizer.encode(text)[:MAX_TOKENS]
    if blend is None:
        return {l: np.array(v)[0] for l, v in positions(model, ids).items()}
    set_position_blend(model, blend)
    try:
        return {l: np.array(v)[0] for l, v in positions(model, ids).items()}
    finally:
        set_position_blend(model, 0.0)  # the model is shared with other tests


# --- the page through selenium -------------------------------------------------------------


def errors_in_console(browser):
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def until(browser, script, *args):
    """Wait until the JavaScript expression ``script`` is truthy; its value."""
    return WebDriverWait(browser, TIMEOUT).until(lambda d: d.execute_script("return " + script, *args))


def open_served(browser, url, text=TEXT):
    browser.get(url)
    errors_in_console(browser)  # start each page with an empty log
    box = browser.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)  # typed, as a person would
    browser.find_element(By.ID, "run").click()
    until(browser, "window.viewer && document.getElementById('plot').data && !document.getElementById('run').disabled")


TRACE = """
const t = document.getElementById('plot').data.find((t) => t.uid === arguments[0]);
return t ? {x: Array.from(t.x), y: Array.from(t.y), type: t.type, visible: t.visible} : null;
"""


def trace(browser, uid):
    return browser.execute_script(TRACE, uid)


def layout(browser, key):
    return browser.execute_script("return document.getElementById('plot')._fullLayout[arguments[0]].range", key)


def choose(browser, id, value):
    Select(browser.find_element(By.ID, id)).select_by_value(str(value))


def text_of(browser, id):
    return browser.find_element(By.ID, id).text


def click_point(browser, x, y, axis=""):
    """Click the plot where data point (x, y) of subplot ``axis`` ("", "2", ...) is drawn."""
    px, py = browser.execute_script(
        """const gd = document.getElementById('plot'), L = gd._fullLayout;
        const xa = L['xaxis' + arguments[0]], ya = L['yaxis' + arguments[0]], r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(arguments[1]), r.top + ya._offset + ya.l2p(arguments[2])];""",
        axis, x, y,
    )
    actions = ActionBuilder(browser)
    actions.pointer_action.move_to_location(round(px), round(py)).click()
    actions.perform()


def text_colours(browser):
    """The text view's tokens and their background colours (r, g, b)."""
    spans = browser.execute_script(
        "return Array.from(document.getElementById('textview').children)"
        ".map((s) => [s.textContent, getComputedStyle(s).backgroundColor, s.className]);"
    )
    rgb = [tuple(int(c) for c in re.findall(r"[\d.]+", bg)[:3]) for _, bg, _ in spans]
    return [t for t, _, _ in spans], rgb, [c for _, _, c in spans]


def exact(values, z):
    """The page's numbers are repo_mlx.positions' float32 values, exactly."""
    np.testing.assert_array_equal(np.array(values, dtype=np.float64), np.asarray(z, dtype=np.float64))


# --- served page --------------------------------------------------------------------------


def test_served_page_draws_the_positions(browser, server, tiny, shots):
    model, tokenizer = tiny
    open_served(browser, server)
    z = z_of(model, tokenizer, TEXT)
    ids = tokenizer.encode(TEXT)
    first = min(z)
    assert text_of(browser, "status").startswith(f"{len(ids)} tokens; RePo layers 1, 2, 3")
    assert "layer 1 head 0" in browser.find_element(By.CSS_SELECTOR, "#plot .gtitle").text
    repo = trace(browser, "repo")
    assert repo["type"] == "scatter"
    assert repo["x"] == list(range(len(ids)))
    exact(repo["y"], z[first][0])
    np.testing.assert_allclose(layout(browser, "yaxis"), inlier_range(z[first][0]), rtol=0, atol=1e-9)
    s = summary(z[first][0])
    assert f"min {s['min']:.2f}, max {s['max']:.2f}, IQR {s['iqr']:.2f}" in text_of(browser, "summary")
    assert f"{len(outliers(z[first][0]))} outliers" in text_of(browser, "summary")
    # Hovering a point shows its token.
    i = int(np.argmin(np.abs(z[first][0] - np.median(z[first][0]))))
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "plot")).perform()
    px, py = browser.execute_script(
        """const gd = document.getElementById('plot'), L = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + L.xaxis._offset + L.xaxis.l2p(arguments[0]), r.top + L.yaxis._offset + L.yaxis.l2p(arguments[1])];""",
        i, float(z[first][0][i]),
    )
    actions = ActionBuilder(browser)
    actions.pointer_action.move_to_location(round(px), round(py))
    actions.perform()
    hover = until(browser, "document.querySelector('#plot .hoverlayer .hovertext')?.textContent")
    token = token_texts(tokenizer, ids)[i]
    assert json.dumps(token) in hover and f"index {i}" in hover
    shots(browser, "01-served-plot")
    # Offline: the page fetched nothing but its own server, and nothing failed.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert resources and all(r.startswith(server) for r in resources), resources
    assert errors_in_console(browser) == []


def test_switching_layer_and_head(browser, server, tiny, shots):
    model, tokenizer = tiny
    open_served(browser, server)
    z = z_of(model, tokenizer, TEXT)
    _, before, _ = text_colours(browser)
    summary_before = text_of(browser, "summary")
    choose(browser, "layer", 3)
    choose(browser, "head", 2)
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes('layer 3 head 2')")
    exact(trace(browser, "repo")["y"], z[3][2])
    np.testing.assert_allclose(layout(browser, "yaxis"), inlier_range(z[3][2]), rtol=0, atol=1e-9)
    assert text_of(browser, "summary").startswith("layer 3 head 2:") and text_of(browser, "summary") != summary_before
    assert text_colours(browser)[1] != before  # the text view follows the head
    shots(browser, "02-layer3-head2")


def test_focused_and_global_range(browser, server, tiny, shots):
    model, tokenizer = tiny
    z = z_of(model, tokenizer, TEXT)
    layer, head = off_range_head(z)  # so the toggle shows something
    open_served(browser, server)
    choose(browser, "layer", layer)
    choose(browser, "head", head)
    zh = z[layer][head]
    lo, hi = inlier_range(zh)
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes(arguments[0])", f"layer {layer} head {head}")
    np.testing.assert_allclose(layout(browser, "yaxis"), (lo, hi), rtol=0, atol=1e-9)
    off = trace(browser, "off")
    assert off["x"] == np.flatnonzero((zh < lo) | (zh > hi)).tolist()
    np.testing.assert_allclose(off["y"], np.where(zh[off["x"]] > hi, hi, lo), rtol=0, atol=1e-9)
    assert "focused" in browser.find_element(By.CSS_SELECTOR, "#plot .gtitle").text
    shots(browser, "03-focused")

    choose(browser, "range", "global")
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes('global')")
    np.testing.assert_allclose(layout(browser, "yaxis"), inlier_range(zh, full=True), rtol=0, atol=1e-9)
    assert trace(browser, "off") is None  # every point is on the plot
    exact(trace(browser, "repo")["y"], zh)
    shots(browser, "04-global")


def test_clicking_a_point_highlights_the_tokens_around_it(browser, server, tiny, shots):
    model, tokenizer = tiny
    z = z_of(model, tokenizer, TEXT)
    tokens = token_texts(tokenizer, tokenizer.encode(TEXT))
    open_served(browser, server)
    choose(browser, "range", "global")  # every point on the plot, so any can be clicked
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes('global')")
    i = 12
    click_point(browser, i, float(z[1][0][i]))
    until(browser, "window.viewer.state().picked === 12")
    near = trace(browser, "near")
    assert near["x"] == list(range(i - 8, i + 9))
    exact(near["y"], z[1][0][i - 8 : i + 9])
    span = browser.find_element(By.CSS_SELECTOR, "#span .text")
    assert span.get_attribute("textContent") == "".join(tokens[i - 8 : i + 9])
    assert browser.find_element(By.CSS_SELECTOR, "#span mark").get_attribute("textContent") == tokens[i]
    _, _, classes = text_colours(browser)
    assert [k for k, c in enumerate(classes) if c] == list(range(i - 8, i + 9))
    assert classes[i] == "center"
    shots(browser, "05-clicked")

    # The highlight stays on the same tokens for another head.
    choose(browser, "head", 3)
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes('head 3')")
    exact(trace(browser, "near")["y"], z[1][3][i - 8 : i + 9])

    # Clicking a token in the text view picks it too; the span is cut at the text's start.
    browser.find_element(By.CSS_SELECTOR, "#textview span[data-i='3']").click()
    until(browser, "window.viewer.state().picked === 3")
    assert trace(browser, "near")["x"] == list(range(0, 12))


def test_small_multiples(browser, server, tiny, shots):
    model, tokenizer = tiny
    z = z_of(model, tokenizer, TEXT)
    open_served(browser, server)
    choose(browser, "layer", 2)
    choose(browser, "view", "heads")
    until(browser, "document.getElementById('plot').data.some((t) => t.uid === 'panel-2-3')")
    for h in range(4):
        exact(trace(browser, f"panel-2-{h}")["y"], z[2][h])
        axis = "yaxis" + (str(h + 1) if h else "")
        np.testing.assert_allclose(layout(browser, axis), inlier_range(z[2][h]), rtol=0, atol=1e-9)
    assert browser.execute_script("return document.getElementById('plot')._fullLayout.grid.columns") == 4
    shots(browser, "06-all-heads")

    choose(browser, "head", 1)
    choose(browser, "view", "layers")
    until(browser, "document.getElementById('plot').data.some((t) => t.uid === 'panel-3-1')")
    uids = browser.execute_script("return document.getElementById('plot').data.map((t) => t.uid)")
    assert [u for u in uids if u.startswith("panel")] == ["panel-1-1", "panel-2-1", "panel-3-1"]
    for l in (1, 2, 3):
        exact(trace(browser, f"panel-{l}-1")["y"], z[l][1])
    shots(browser, "07-head-across-layers")

    # Clicking a point of a panel opens that layer and head, the point picked.
    choose(browser, "range", "global")
    until(browser, "document.getElementById('range').value === 'global'")
    click_point(browser, 5, float(z[3][1][5]), axis="3")
    until(browser, "document.getElementById('view').value === 'one' && window.viewer.state().picked !== null")
    state = browser.execute_script("return window.viewer.state()")
    assert (state["layer"], state["head"]) == (3, 1)
    assert abs(state["picked"] - 5) <= 1  # the nearest point to the click


def test_plain_rope_reference_line(browser, server, tiny, shots):
    model, tokenizer = tiny
    z = z_of(model, tokenizer, TEXT)
    rope = z_of(model, tokenizer, TEXT, blend=1.0)
    open_served(browser, server)
    for l, h in ((1, 0), (3, 2)):
        choose(browser, "layer", l)
        choose(browser, "head", h)
        until(browser, "document.querySelector('#plot .gtitle').textContent.includes(arguments[0])", f"layer {l} head {h}")
        line = trace(browser, "rope")
        assert line["visible"] is True
        exact(line["y"], rope[l][h])  # position_blend 1: the same text under plain RoPE
        assert line["x"] == list(range(len(rope[l][h])))
        assert not np.array_equal(line["y"], z[l][h])
    browser.find_element(By.ID, "rope").click()
    until(browser, "document.getElementById('plot').data.find((t) => t.uid === 'rope').visible === false")
    choose(browser, "view", "heads")
    until(browser, "document.getElementById('plot').data.some((t) => t.uid === 'panel-3-0')")
    uids = browser.execute_script("return document.getElementById('plot').data.map((t) => t.uid)")
    assert not [u for u in uids if u.startswith("rope")]


def off_range_head(z):
    """A (layer, head) whose focused range leaves points out."""
    return next(
        (l, h) for l in sorted(z) for h in range(z[l].shape[0])
        if ((z[l][h] < inlier_range(z[l][h])[0]) | (z[l][h] > inlier_range(z[l][h])[1])).any()
    )


def test_text_view_colours_tokens_by_position(browser, server, tiny, shots):
    model, tokenizer = tiny
    z = z_of(model, tokenizer, TEXT)
    tokens = token_texts(tokenizer, tokenizer.encode(TEXT))
    layer, head = off_range_head(z)
    zh = z[layer][head]
    lo, hi = inlier_range(zh)
    open_served(browser, server)
    choose(browser, "layer", layer)
    choose(browser, "head", head)
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes(arguments[0])", f"layer {layer} head {head}")
    shown, focused, _ = text_colours(browser)
    assert shown == tokens

    def check_order(rgb):
        # Blue minus red falls as the position rises, on both halves of the colour scale.
        order = np.argsort(zh, kind="stable")
        blue_minus_red = np.array([rgb[i][2] - rgb[i][0] for i in order])
        assert (np.diff(blue_minus_red) <= 2).all()  # 2: rounding of the colours
        assert blue_minus_red[0] > blue_minus_red[-1]

    check_order(focused)
    # Tokens off the focused range take its end colours.
    assert all(focused[i] == LOW for i in np.flatnonzero(zh < lo))
    assert all(focused[i] == HIGH for i in np.flatnonzero(zh > hi))
    shots(browser, "08-text-view")

    choose(browser, "range", "global")
    until(browser, "document.getElementById('legend-note').textContent.includes('global')")
    _, rgb, _ = text_colours(browser)
    check_order(rgb)
    assert LOW not in rgb and HIGH not in rgb  # the global range is padded beyond every token
    assert rgb != focused


def test_bad_requests_show_a_message_and_the_server_keeps_serving(browser, server, tiny, shots):
    model, tokenizer = tiny
    browser.get(server)
    errors_in_console(browser)
    browser.find_element(By.ID, "run").click()
    assert "empty" in until(browser, "document.getElementById('error').textContent")
    shots(browser, "09-empty-text")

    box = browser.find_element(By.ID, "text")
    browser.execute_script("arguments[0].value = arguments[1]", box, "word " * (MAX_BYTES // 4))
    browser.find_element(By.ID, "run").click()
    until(browser, "document.getElementById('error').textContent.includes('larger')")
    assert f"larger than {MAX_BYTES} bytes" in text_of(browser, "error")
    assert "--max-request-bytes" in text_of(browser, "error")
    shots(browser, "10-too-large")

    box.clear()
    box.send_keys(TEXT)
    browser.find_element(By.ID, "run").click()
    until(browser, "document.getElementById('error').textContent === '' && document.getElementById('plot').data")
    exact(trace(browser, "repo")["y"], z_of(model, tokenizer, TEXT)[1][0])


def test_a_long_text_is_cut_with_a_warning(browser, server, tiny, shots):
    model, tokenizer = tiny
    total = len(tokenizer.encode(LONG))
    assert total > MAX_TOKENS
    open_served(browser, server, LONG)
    assert text_of(browser, "warning") == (
        f"The text has {total} tokens; only the first {MAX_TOKENS} are shown (the limit is {MAX_TOKENS} tokens)."
    )
    exact(trace(browser, "repo")["y"], z_of(model, tokenizer, LONG)[1][0])
    shots(browser, "11-cut")


# --- the HTTP API -------------------------------------------------------------------------


def post(url, body, headers=None, path="/positions"):
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    reply = r.status, json.loads(r.read())
    conn.close()
    return reply


def get(url, path="/", headers=None):
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    reply = r.status, r.getheader("Content-Type"), r.read()
    conn.close()
    return reply


def raw_exchange(url, head: bytes):
    port = int(url.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(head)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    header, _, body = reply.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(body)


BAD = {
    "empty text": ({"text": ""}, 400, "empty"),
    "blank text": ({"text": " \n "}, 400, "empty"),
    "no text": ({}, 400, "text must be a string"),
    "text not a string": ({"text": 5}, 400, "text must be a string"),
    "not a RePo layer": ({"text": "hi", "layer": 0}, 400, "not a RePo layer; RePo layers are 1, 2, 3"),
    "layer not a number": ({"text": "hi", "layer": "x"}, 400, "not a RePo layer"),
    "unknown head": ({"text": "hi", "head": 4}, 400, "must be 0..3"),
    "head true": ({"text": "hi", "head": True}, 400, "head must be an integer"),
    "not an object": ([1, 2], 400, "JSON object"),
    "not JSON": (b"{text", 400, "not valid JSON"),
    "NaN": (b'{"text": NaN}', 400, "not valid JSON"),
    "not UTF-8": (b'{"text": "\xff"}', 400, "not valid JSON"),
    "too large": ({"text": "a" * MAX_BYTES}, 413, f"larger than {MAX_BYTES} bytes"),
    "nested too deep": (b"[" * 900 + b"]" * 900, 400, "levels deep"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_requests_over_http(server, name):
    body, status, message = BAD[name]
    got, reply = post(server, body)
    assert got == status and message in reply["error"]["message"], reply


def test_bad_framing_and_paths_over_http(server, tiny):
    head = b"POST /positions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    assert raw_exchange(server, head)[0] == 413
    assert raw_exchange(server, b"POST /positions HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 411
    assert raw_exchange(server, b"POST /positions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")[0] == 400
    assert post(server, {"text": "hi"}, path="/v1/completions")[0] == 404
    status, _, body = get(server, "/nothing")
    assert status == 404 and "No such page" in json.loads(body)["error"]["message"]
    # Still serving, with exactly repo_mlx.positions' numbers for the asked layer and head.
    model, tokenizer = tiny
    status, data = post(server, {"text": TEXT, "layer": 2, "head": 1})
    assert status == 200 and data["layers"] == [2] and data["heads"] == [1]
    got = np.frombuffer(base64.b64decode(data["positions"]["2"]), dtype="<f4")
    exact(got, z_of(model, tokenizer, TEXT)[2][1])
    assert data["focused"]["2"] == [list(inlier_range(got))]


def test_origin_check_over_http(server):
    evil = {"Origin": "http://evil.example"}
    status, reply = post(server, {"text": TEXT}, headers=evil)
    assert status == 403 and "--allowed-origins" in reply["error"]["message"]
    assert get(server, "/", headers=evil)[0] == 403
    # A page that rebinds its name to 127.0.0.1 keeps its own origin, and is refused too.
    port = server.rsplit(":", 1)[1].strip("/")
    assert post(server, {"text": TEXT}, headers={"Origin": f"http://evil.example:{port}"})[0] == 403
    # The viewer's own page, under either loopback name.
    for origin in (server.rstrip("/"), f"http://localhost:{port}"):
        assert post(server, {"text": TEXT}, headers={"Origin": origin})[0] == 200
    status, kind, page = get(server, "/")
    assert status == 200 and kind.startswith("text/html") and b"RePo positions" in page


def test_concurrent_texts_are_served_in_turn(server, tiny):
    model, tokenizer = tiny
    texts = [f"Text number {i} is here." for i in range(4)]
    replies = [None] * len(texts)

    def send(i):
        replies[i] = post(server, {"text": texts[i], "layer": 3, "head": 0})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for text, (status, data) in zip(texts, replies):
        assert status == 200
        exact(np.frombuffer(base64.b64decode(data["positions"]["3"]), dtype="<f4"), z_of(model, tokenizer, text)[3][0])


def test_ctrl_c_stops_the_viewer():
    proc, url = start_viewer()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(TIMEOUT) == 130


def test_allowed_origins_flag():
    proc, url = start_viewer("--allowed-origins", "http://app.example:3000")
    try:
        assert post(url, {"text": TEXT}, headers={"Origin": "http://app.example:3000"})[0] == 200
        assert post(url, {"text": TEXT}, headers={"Origin": "http://app.example"})[0] == 403
    finally:
        stop(proc)


def test_yarn_flag_extends_the_context():
    proc, url = start_viewer("--yarn", "2")
    try:
        status, data = post(url, {"text": TEXT})
        assert status == 200 and data["limit"] == 8192
    finally:
        stop(proc)


# --- the static page (--html) -------------------------------------------------------------


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random RePo checkpoint with a context of 4096 and one token per byte of text."""
    path = tmp_path_factory.mktemp("ctx4096") / "model"
    cfg = synthetic.config(max_position_embeddings=4096)
    synthetic.write_checkpoint(path, cfg, seed=3)
    return path


def test_html_file_at_4096_tokens_offline(browser, long_model, tmp_path, shots):
    rng = np.random.default_rng(0)
    words = ["the", "grass", "is", "green", "sky", "blue", "and", "we", "go", "here"]
    text = " ".join(rng.choice(words, 1200))
    prompt, out = tmp_path / "text.txt", tmp_path / "page.html"
    prompt.write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.viewer", "--model", str(long_model), "--html", str(out), "--prompt-file", str(prompt)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    model, tokenizer = repo_mlx.load(str(long_model))
    ids = tokenizer.encode(text)
    assert len(ids) > 4096  # cut at the model's context, not at 512
    z = {l: np.array(v)[0] for l, v in positions(model, ids[:4096]).items()}
    assert f"4096 tokens (the first of {len(ids)}); wrote {out}" in r.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    html = out.read_text(encoding="utf-8")
    js = viewer.plotly_js().replace("</script", "<\\/script")
    assert html.count(js) == 1
    # Outside the plotly.js bundle (whose map styles name tile servers it never fetches
    # here), the page refers to nothing: no URL, no src or href but inline data.
    rest = html.replace(js, "")
    assert not re.findall(r"https?:|\bsrc\s*=|\bhref\s*=(?!\s*[\"']data:)|@import|url\(", rest)
    assert "default-src 'none'" in rest

    browser.get(out.as_uri())
    until(browser, "window.viewer && document.getElementById('plot').data")
    repo = trace(browser, "repo")
    assert repo["type"] == "scattergl" and len(repo["y"]) == 4096
    exact(repo["y"], z[1][0])
    assert text_of(browser, "warning").startswith(f"The text has {len(ids)} tokens; only the first 4096")
    assert not browser.find_element(By.ID, "text").is_displayed()  # no server behind a static page
    choose(browser, "layer", 3)
    choose(browser, "head", 2)
    until(browser, "document.querySelector('#plot .gtitle').textContent.includes('layer 3 head 2')")
    exact(trace(browser, "repo")["y"], z[3][2])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#textview span")) == 4096
    shots(browser, "12-html-4096")
    choose(browser, "view", "heads")
    until(browser, "document.getElementById('plot').data.some((t) => t.uid === 'panel-3-3')")
    exact(trace(browser, "panel-3-3")["y"], z[3][3])
    shots(browser, "13-html-4096-heads")
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert errors_in_console(browser) == []


def test_html_needs_a_text_and_writes_nothing_on_failure(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "repo_mlx.viewer", "--model", str(FIXTURE), "--html", str(tmp_path / "a.html")],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --html needs the text to show: --prompt-file F (or --prompt TEXT)."
    ]
    with pytest.raises(LoadError, match="go with --html"):
        viewer.command(["--model", str(FIXTURE), "--prompt", "hi"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(LoadError, match="The text is empty"):
        viewer.command(["--model", str(FIXTURE), "--html", str(tmp_path / "b.html"), "--prompt-file", str(empty)])
    # A place that cannot be written is refused while parsing (tests/test_cli_flags.py).
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty.txt"]


def test_plotly_is_an_optional_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    with pytest.raises(LoadError, match=r"pip install 'repo-mlx\[viewer\]'"):
        viewer.plotly_js()


def test_page_data_is_positions_py_per_head(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    z = {l: np.array(v) for l, v in positions(model, ids).items()}
    data = viewer.page_data(z, token_texts(tokenizer, ids))
    assert data["layers"] == [1, 2, 3] and data["heads"] == [0, 1, 2, 3]
    for l in (1, 2, 3):
        rows = np.frombuffer(base64.b64decode(data["positions"][str(l)]), dtype="<f4").reshape(4, -1)
        exact(rows, z[l][0])
        assert data["focused"][str(l)] == [inlier_range(r) for r in rows]
        assert data["global"][str(l)] == [inlier_range(r, full=True) for r in rows]
        assert data["summary"][str(l)] == [summary(r) for r in rows]
    one = viewer.page_data({1: z[1][:, :, :1]}, ["The"])
    assert one["summary"]["1"][0]["increasing"] is None  # NaN has no JSON; the page says n/a
    json.dumps(one, allow_nan=False)
    # A text can hold "</script>": it stays text.
    page = viewer.page(viewer.page_data(z, ["</script><script>alert(1)//"] + ["x"] * (len(ids) - 1)), js="/*js*/")
    assert "</script><script>alert" not in page


@pytest.mark.parametrize("flags", [["--model", "no-such-model"], ["--max-tokens", "100000000"]])
def test_bad_model_and_absurd_max_tokens_are_one_line(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--model", "demo", *flags,  # the built-in model; a later --model wins
            "--prompt", "hi", "--html", str(tmp_path / "v.html")]
    with pytest.raises(SystemExit) as e:
        viewer.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error:"), err
    assert not (tmp_path / "v.html").exists()
