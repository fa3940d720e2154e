"""The kiosk page in a real headless Chromium (Debian's chromium + chromium-driver).

The page is served by the real waitress server (``tests/fake_engine.py`` as a
launcher: the real app and server around the deterministic fake engine), loaded at
the kiosk panel's 800×480 and at a phone's 390×844. Screenshots are saved under
pytest's tmp path, and copied to /tmp/kiosk_800x480.png and /tmp/kiosk_390x844.png
for a person to look at.

Needs: ``apt-get install chromium chromium-driver`` and ``pip install selenium``;
skipped with the reason when either is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "fake_engine.py"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the environment
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install selenium)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(CHROMEDRIVER is None, reason="chromedriver is not installed (apt-get install chromium-driver)"),
]

KIOSK = (800, 480)
PHONE = (390, 844)
HINT = "上下文信息不足，建议补充更多背景"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(*args: str):
    """Start the launcher on a free port; return (process, base URL) once /healthz answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--port", str(port), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "healthz", timeout=1) as response:
                if response.status == 200:
                    return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"test server did not start:\n{proc.stdout.read()}")
            time.sleep(0.1)


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def server():
    """The real app + waitress with the fake engine (random_init, so the banner shows)."""
    proc, base = launch("--random-init")
    yield base
    output = stop(proc)
    assert "Traceback" not in output
    assert "-> 404" not in output  # the page asks for nothing the server lacks (e.g. a favicon)


@pytest.fixture(scope="module")
def driver():
    """One headless Chromium for the module, with a fresh profile and no network chatter."""
    profile = tempfile.mkdtemp(prefix="kiosk-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=800,480"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, url: str, size: tuple[int, int], mobile: bool = False) -> None:
    """Load the page with an exact CSS viewport of ``size`` (what the panel/phone shows)."""
    width, height = size
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
    )
    driver.get(url)
    wait(driver).until(lambda d: d.find_element(By.ID, "model").text.startswith("模型"))


def wait(driver, seconds: float = 10) -> WebDriverWait:
    return WebDriverWait(driver, seconds)


def result_rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#output .cand")


def predict_and_wait(driver, submit) -> None:
    """Run ``submit`` and wait until a new answer (or an error) is on the page."""
    driver.execute_script("document.getElementById('output').dataset.stale = '1';"
                          "document.getElementById('output').textContent = '';")
    submit()
    wait(driver).until(lambda d: result_rows(d) or d.find_element(By.ID, "error").is_displayed())


def set_text(driver, text: str) -> None:
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    shutil.copy(path, Path("/tmp") / name)  # for a person to look at
    return path


def assert_fits(driver, width: int, height: int | None) -> None:
    """No horizontal scrolling; with ``height``, nothing below the fold either."""
    scroll_w, scroll_h = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    assert scroll_w <= width, f"page is {scroll_w}px wide in a {width}px viewport"
    if height is not None:
        assert scroll_h <= height, f"page is {scroll_h}px tall in a {height}px viewport"


def test_kiosk_800x480_example_chip_button_bars(server, driver, tmp_path):
    open_page(driver, server, KIOSK)
    banner = driver.find_element(By.ID, "random-banner")
    assert banner.is_displayed() and "随机" in banner.text  # random_init is shouted

    chip = driver.find_element(By.XPATH, "//button[@class='chip' and contains(., '床前明月光')]")
    chip.click()
    assert driver.find_element(By.ID, "text").get_attribute("value") == "床前明月光，疑是地[MASK]霜。"
    button = driver.find_element(By.ID, "predict")
    assert button.text == "🔮 预测缺失内容"
    predict_and_wait(driver, button.click)

    rows = result_rows(driver)
    assert len(rows) == 5
    percents = [row.find_element(By.CLASS_NAME, "pct").text for row in rows]
    assert percents == ["81%", "9.0%", "4.0%", "2.0%", "1.0%"]
    words = [row.find_element(By.CLASS_NAME, "word").text for row in rows]
    assert words == ["上", "下", "好", "吃", "热"]
    bar_widths = [row.find_element(By.CLASS_NAME, "fill").size["width"] for row in rows]
    track = rows[0].find_element(By.CLASS_NAME, "bar").size["width"]
    assert bar_widths == sorted(bar_widths, reverse=True)
    assert abs(bar_widths[0] - 0.81 * track) <= 2  # bar length is the probability
    assert driver.find_element(By.CSS_SELECTOR, "#output .filled").text == "床前明月光，疑是地上霜。"
    assert not driver.find_element(By.ID, "error").is_displayed()
    assert not driver.find_elements(By.CSS_SELECTOR, "#output .hint")  # confident answer: no hint

    # The whole kiosk fits the panel: no scrolling, the button is on screen and big.
    assert_fits(driver, *KIOSK)
    overflow = driver.execute_script(
        "var p = document.querySelector('.input-panel'); return p.scrollHeight - p.clientHeight")
    assert overflow <= 0, f"input panel needs scrolling ({overflow}px): examples are cut off"
    rect = driver.execute_script("return document.getElementById('predict').getBoundingClientRect().toJSON()")
    assert rect["bottom"] <= KIOSK[1] and rect["height"] >= 48
    for element in driver.find_elements(By.CSS_SELECTOR, "button"):
        if element.is_displayed():
            assert element.size["height"] >= 44, f"touch target too small: {element.text}"
    save_screenshot(driver, tmp_path, "kiosk_800x480.png")


def test_enter_submits_and_multi_blank_hint(server, driver, tmp_path):
    open_page(driver, server, KIOSK)
    set_text(driver, "他做事总是[MASK][MASK][MASK][MASK]，让人放心。我们一起去[MASK]饭吧。")
    box = driver.find_element(By.ID, "text")
    predict_and_wait(driver, lambda: box.send_keys(Keys.ENTER))
    assert "\n" not in box.get_attribute("value")  # Enter submitted instead of adding a line
    blanks = driver.find_elements(By.CSS_SELECTOR, "#output .blank")
    assert len(blanks) == 2
    assert "第 1 个空" in blanks[0].text and "第 2 个空" in blanks[1].text
    assert "一丝不苟" in blanks[0].text and "35%" in blanks[0].text
    hints = driver.find_elements(By.CSS_SELECTOR, "#output .hint")
    assert len(hints) == 1 and HINT in hints[0].text and hints[0].is_displayed()
    assert driver.find_element(By.CSS_SELECTOR, "#output .filled").text == \
        "他做事总是一丝不苟，让人放心。我们一起去上饭吧。"
    save_screenshot(driver, tmp_path, "kiosk_800x480_multi.png")


def test_the_source_of_an_answer_shows_under_it(server, driver, tmp_path):
    open_page(driver, server, KIOSK)
    set_text(driver, "床前明月光，疑是地[MASK]霜。")
    predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
    quote = driver.find_element(By.CSS_SELECTOR, "#output .quote")
    assert quote.is_displayed()
    assert "床前明月光，疑是地上霜。" in quote.text and "李白《静夜思》（唐）" in quote.text
    sources = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#output .cand .src")]
    assert sources[0] == "词库·语料" and sources[1] == "模型·词库"
    save_screenshot(driver, tmp_path, "kiosk_800x480_quote.png")
    # "仅模型" asks for the model alone: no quote, and the page says so.
    driver.find_element(By.ID, "model-only").click()
    predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
    assert not driver.find_elements(By.CSS_SELECTOR, "#output .quote")
    assert "仅模型" in driver.find_element(By.ID, "meta").text


def test_error_message_is_visible(server, driver, tmp_path):
    open_page(driver, server, KIOSK)
    set_text(driver, "今天天气很[MASK]。")
    predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
    assert len(result_rows(driver)) == 5
    # A bad request: the error shows, and the old answer (for another sentence) goes.
    set_text(driver, "这句话没有空")
    driver.find_element(By.ID, "predict").click()
    wait(driver).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    error = driver.find_element(By.ID, "error")
    assert "[MASK]" in error.text
    assert not result_rows(driver)
    save_screenshot(driver, tmp_path, "kiosk_800x480_error.png")
    # The next good request clears the error.
    set_text(driver, "我们一起去[MASK]饭吧。")
    predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
    assert not driver.find_element(By.ID, "error").is_displayed()
    assert len(result_rows(driver)) == 5


def test_insert_mask_button(server, driver):
    open_page(driver, server, KIOSK)
    set_text(driver, "我们去吃饭")
    driver.execute_script("var t = document.getElementById('text'); t.setSelectionRange(3, 3);")
    driver.find_element(By.ID, "insert-mask").click()
    assert driver.find_element(By.ID, "text").get_attribute("value") == "我们去[MASK]吃饭"


def test_phone_layout(server, driver, tmp_path):
    open_page(driver, server, PHONE, mobile=True)
    driver.find_element(By.XPATH, "//button[@class='chip' and contains(., '今天天气')]").click()
    predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
    assert len(result_rows(driver)) == 5
    assert_fits(driver, PHONE[0], None)  # the page may scroll down, never sideways
    # The answer is below the input on a phone: the page scrolls it into view.
    in_view = ("var r = document.querySelectorAll('#output .cand')[4].getBoundingClientRect();"
               "return r.top >= 0 && r.bottom <= window.innerHeight;")
    wait(driver, 5).until(lambda d: d.execute_script(in_view))
    button = driver.find_element(By.ID, "predict")
    assert button.size["width"] >= PHONE[0] - 60  # full-width primary button
    save_screenshot(driver, tmp_path, "kiosk_390x844.png")


def test_network_error_is_shown(server, driver):
    open_page(driver, server, KIOSK)
    # Point the page's fetch at a closed port: the user must see a message, not nothing.
    driver.execute_script(
        "window.fetch = function () { return Promise.reject(new TypeError('offline')); };")
    set_text(driver, "今天天气很[MASK]。")
    driver.find_element(By.ID, "predict").click()
    try:
        wait(driver, 5).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    except TimeoutException:
        pytest.fail("no error shown when the server cannot be reached")
    assert "无法连接服务器" in driver.find_element(By.ID, "error").text
    assert driver.find_element(By.ID, "predict").is_enabled()  # the button comes back


def test_token_prompt(driver):
    """With a token configured, the page asks for it once and then works."""
    proc, base = launch("--token", "kiosk-token")
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": KIOSK[0], "height": KIOSK[1], "deviceScaleFactor": 1, "mobile": False})
        driver.get(base)
        wait(driver).until(lambda d: d.find_element(By.ID, "token-box").is_displayed())
        assert "令牌" in driver.find_element(By.ID, "error").text
        driver.find_element(By.ID, "token").send_keys("kiosk-token")
        driver.find_element(By.ID, "save-token").click()
        wait(driver).until(lambda d: d.find_element(By.ID, "model").text.startswith("模型"))
        assert not driver.find_element(By.ID, "token-box").is_displayed()
        set_text(driver, "今天天气很[MASK]。")
        predict_and_wait(driver, driver.find_element(By.ID, "predict").click)
        assert len(result_rows(driver)) == 5
    finally:
        driver.execute_script("localStorage.clear()")
        stop(proc)


def fontconfig_families(pattern: str) -> set[str]:
    """Every family name (all its localised names) of the installed fonts matching a
    fontconfig pattern, e.g. ``:lang=zh`` or ``:charset=1f52e``."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        pytest.fail("fc-list (fontconfig) is missing: Chromium cannot have found any font either")
    listing = subprocess.run([fc_list, pattern, "family"], capture_output=True, text=True, check=True).stdout
    return {name.strip() for line in listing.splitlines() for name in line.split(",") if name.strip()}


def fonts_rendering(driver, text: str) -> list[dict]:
    """The platform fonts Chromium used to draw ``text`` in the page's own font stack
    (a span appended to the heading), as DevTools reports them: family and glyph count."""
    driver.execute_script(
        "var s = document.createElement('span'); s.id = 'font-probe'; s.textContent = arguments[0];"
        "var old = document.getElementById('font-probe'); if (old) old.remove();"
        "document.querySelector('h1').appendChild(s);", text)
    driver.execute_cdp_cmd("DOM.enable", {})
    driver.execute_cdp_cmd("CSS.enable", {})
    root = driver.execute_cdp_cmd("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    span = driver.execute_cdp_cmd("DOM.querySelector", {"nodeId": root, "selector": "#font-probe"})["nodeId"]
    # The span's text is its child text node; fonts are reported for the text it holds.
    return driver.execute_cdp_cmd("CSS.getPlatformFontsForNode", {"nodeId": span})["fonts"]


def test_chinese_and_emoji_are_drawn_with_fonts_that_have_them(server, driver):
    """Without a CJK font Chromium draws every Chinese character of the page as a box, and
    🔮 without an emoji font; both happen silently. So every font that drew the page's
    Chinese text must be one fontconfig lists for Chinese, and the emoji's one that has
    U+1F52E (install.sh --kiosk and the SD image bring fonts-wqy-microhei and
    fonts-noto-color-emoji; `make browser` installs them here)."""
    open_page(driver, server, KIOSK)
    han_text = "床前明月光疑是地上霜中文填空预测缺失内容模型上下文信息不足建议补充更多背景"
    han_fonts = fonts_rendering(driver, han_text)
    chinese = fontconfig_families(":lang=zh")
    assert chinese, "no font with Chinese glyphs is installed (apt-get install fonts-wqy-microhei)"
    assert han_fonts and sum(f["glyphCount"] for f in han_fonts) == len(han_text), han_fonts
    for font in han_fonts:
        assert font["familyName"] in chinese, (
            f"Chinese text drawn with {font['familyName']!r}, a font without Chinese glyphs "
            f"(fonts with them: {sorted(chinese)})")
    emoji_fonts = fonts_rendering(driver, "🔮")
    with_emoji = fontconfig_families(":charset=1f52e")
    assert with_emoji, "no font has 🔮 (U+1F52E) (apt-get install fonts-noto-color-emoji)"
    assert [f["familyName"] in with_emoji for f in emoji_fonts] == [True], (
        f"🔮 drawn with {emoji_fonts}; fonts that have it: {sorted(with_emoji)}")
