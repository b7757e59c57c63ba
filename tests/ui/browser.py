"""A thin selenium wrapper over the WebUI page: tabs, accordions, paste-back, generation, control values."""

from __future__ import annotations

import time

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

WIDTH = 1366

# The value a control shows, whatever Gradio component it is (checkbox, radio, slider, dropdown, textbox).
READ_JS = """
const el = document.getElementById(arguments[0]);
if (!el) return null;
const box = el.querySelector('input[type=checkbox]');
if (box) return box.checked;
const radios = el.querySelectorAll('input[type=radio]');
if (radios.length) { const c = [...radios].find(r => r.checked); return c ? c.value : null; }
const num = el.querySelector('input[type=number]');
if (num) return num.value;
const text = el.querySelector('textarea, input');
return text ? text.value : null;
"""

# Elements of `arguments[0]` that stick out to its right, and whether the page scrolls sideways.
OVERFLOW_JS = """
const root = document.getElementById(arguments[0]);
const right = root.getBoundingClientRect().right + 1;
const out = [];
for (const el of root.querySelectorAll('*')) {
  const r = el.getBoundingClientRect();
  if (r.width > 0 && r.height > 0 && r.right > right) out.push((el.id || el.className || el.tagName) + ' ' + r.right);
}
return {page: document.documentElement.scrollWidth > window.innerWidth, out: out.slice(0, 10)};
"""


IS_OPEN_JS = """
const wrap = document.querySelector('#' + arguments[0] + ' .label-wrap');
return !!wrap && wrap.classList.contains('open');
"""


class Browser:
    def __init__(self, url: str, chromium: str, driver: str):
        options = Options()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={WIDTH},900"):  # fmt: skip
            options.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.set_page_load_timeout(180)
        self.url = url
        self.driver.get(url)
        self.wait(lambda: self.driver.find_elements(By.CSS_SELECTOR, "#txt2img_generate"), 240, "the WebUI page")
        time.sleep(2)

    def quit(self):
        self.driver.quit()

    def wait(self, check, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = check()
            if found:
                return found
            time.sleep(0.5)
        raise AssertionError(f"waited {timeout}s for {what}")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def tab(self, name: str) -> None:
        for button in self.driver.find_elements(By.CSS_SELECTOR, "#tabs > .tab-nav button, #tabs button"):
            if button.text.strip().lower() == name:
                button.click()
                self.wait(lambda: self.driver.find_element(By.ID, f"tab_{name}").is_displayed(), 30, f"tab {name}")
                return
        raise AssertionError(f"no tab {name}")

    def element(self, elem_id: str):
        return self.driver.find_element(By.ID, elem_id)

    def is_open(self, elem_id: str) -> bool:
        return bool(self.js(IS_OPEN_JS, elem_id))

    def enabled(self, accordion_id: str) -> bool:
        """The value of a host InputAccordion (the technique's `enabled`): its hidden Gradio checkbox."""
        script = "return document.querySelector('#' + arguments[0] + '-checkbox input').checked"
        return bool(self.js(script, accordion_id))

    def set_open(self, elem_id: str, want: bool) -> None:
        if self.is_open(elem_id) != want:
            label = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} .label-wrap")
            self.js("arguments[0].scrollIntoView({block: 'center'})", label)
            label.click()
            self.wait(lambda: self.is_open(elem_id) == want, 120, f"{elem_id} to {'open' if want else 'close'}")

    def overflow(self, elem_id: str) -> dict:
        return self.js(OVERFLOW_JS, elem_id)

    def value(self, elem_id: str):
        return self.js(READ_JS, elem_id)

    def paste(self, tab: str, text: str) -> None:
        """Put `text` into the prompt box and press the host's "read generation parameters" button."""
        box = self.driver.find_element(By.CSS_SELECTOR, f"#{tab}_prompt textarea")
        self.js(
            "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));",
            box,
            text,
        )
        time.sleep(0.5)
        self.driver.find_element(By.CSS_SELECTOR, f"#tab_{tab} #paste").click()
        time.sleep(3)

    def generate(self, tab: str, timeout: float = 300) -> str:
        """Press Generate and return the text of the result area (infotext, error) once the job is over."""
        read = f"""return [document.querySelector('#html_info_{tab}').innerText,
            (document.querySelector('#html_log_{tab}') || {{}}).innerText || '',
            document.querySelector('#{tab}_interrupt').offsetParent !== null]"""
        before = self.js(read)[:2]
        self.driver.find_element(By.ID, f"{tab}_generate").click()

        def done():
            info, log, busy = self.js(read)
            return None if busy or [info, log] == before else f"{info}\n{log}"

        time.sleep(2)
        return self.wait(done, timeout, "the generation to finish")

    def upload(self, elem_id: str, b64_png: str) -> None:
        """Give a base64 PNG to the file input of an image component."""
        import base64
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
            f.write(base64.b64decode(b64_png))
            path = f.name
        field = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]")
        field.send_keys(path)
        time.sleep(3)

    # --- the workflow tests (tests/ui/test_workflow.py) ------------------------------------------------------------
    def click(self, elem_id: str) -> None:
        element = self.element(elem_id)
        self.js("arguments[0].scrollIntoView({block: 'center'})", element)
        element.click()

    def titles(self, ids: list[str]) -> dict:
        """id -> the hover hint the element shows (an accordion: its header's), or None when it is not in the page."""
        return self.js(TITLES_JS, ids)

    def hover_title(self, elem_id: str):
        """The hint the browser shows with the pointer at the middle of the element: the title of the innermost
        titled element there (None when the element is hidden or covered by another)."""
        return self.js(HOVER_JS, elem_id)

    def image_src(self, elem_id: str) -> str | None:
        script = "const i = document.querySelector('#' + arguments[0] + ' img'); return i ? i.src : null"
        return self.js(script, elem_id)

    def wait_image(self, elem_id: str, old: str | None = None, timeout: float = 60) -> str:
        """The src of the image the component shows, once it shows one (other than `old`)."""
        what = f"an image in {elem_id}"
        return self.wait(lambda: (src := self.image_src(elem_id)) and src != old and src, timeout, what)

    def distance(self, src_a: str, src_b: str) -> float:
        """Mean absolute difference (0–255) of two images, both drawn at 32×32 in the page."""
        self.driver.set_script_timeout(60)
        return self.driver.execute_async_script(DISTANCE_JS, src_a, src_b)

    def results(self, tab: str) -> list[str]:
        """The srcs of the result thumbnails in the tab's gallery."""
        return self.js(
            "return [...document.querySelectorAll('#' + arguments[0] + '_gallery .thumbnail-item.thumbnail-small img')]"
            ".map(i => i.src)",
            tab,
        )

    def select_result(self, tab: str, index: int) -> None:
        thumbs = self.driver.find_elements(By.CSS_SELECTOR, f"#{tab}_gallery .thumbnail-item.thumbnail-small")
        self.js("arguments[0].scrollIntoView({block: 'center'})", thumbs[index])
        thumbs[index].click()
        self.wait(lambda: "selected" in thumbs[index].get_attribute("class"), 10, "the thumbnail to be selected")

    def set_number(self, elem_id: str, value) -> None:
        """Type `value` into a slider's or number's box (as a user does), firing the events Gradio listens to."""
        box = self.driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
        self.js(
            "arguments[0].value = arguments[1]; for (const e of ['input', 'change', 'blur']) "
            "arguments[0].dispatchEvent(new Event(e, {bubbles: true}));",
            box,
            str(value),
        )
        time.sleep(0.5)

    def choose(self, elem_id: str, value: str) -> None:
        """Pick `value` of a radio group."""
        label = self.driver.find_element(By.XPATH, f"//*[@id='{elem_id}']//label[.//input[@value='{value}']]")
        self.js("arguments[0].scrollIntoView({block: 'center'})", label)
        label.click()
        self.wait(lambda: self.value(elem_id) == value, 10, f"{elem_id} = {value}")

    def text(self, elem_id: str) -> str:
        return self.js("return document.getElementById(arguments[0]).innerText", elem_id)

    def open_time_ms(self, accordion_id: str, last_id: str) -> float:
        """Milliseconds from a click on the closed accordion's header until `last_id` (its last control) is laid out
        and painted, measured in the page."""
        self.driver.set_script_timeout(60)
        return self.driver.execute_async_script(OPEN_TIME_JS, accordion_id, last_id)

    def paint(self, button_id: str, strokes: list[tuple[float, float, float, float]], shot=None) -> None:
        """Press a brush button and paint `strokes` (x0, y0, x1, y1 as fractions of the image), then Apply."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.click(button_id)
        self.wait(lambda: self.driver.find_elements(By.ID, "imgcond-paint-canvas"), 30, "the paint canvas")
        canvas = self.driver.find_element(By.ID, "imgcond-paint-canvas")
        width, height = self.js("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height]", canvas)
        for x0, y0, x1, y1 in strokes:
            chain = ActionChains(self.driver)
            chain.move_to_element_with_offset(canvas, int((x0 - 0.5) * width), int((y0 - 0.5) * height))
            chain.click_and_hold()
            for i in range(1, 11):
                chain.move_to_element_with_offset(
                    canvas, int((x0 + (x1 - x0) * i / 10 - 0.5) * width), int((y0 + (y1 - y0) * i / 10 - 0.5) * height)
                )
            chain.release().perform()
        if shot:
            self.driver.save_screenshot(str(shot))
        self.driver.find_element(By.ID, "imgcond-paint-apply").click()
        self.wait(lambda: not self.driver.find_elements(By.ID, "imgcond-paint"), 10, "the paint canvas to close")


TITLES_JS = """
const out = {};
for (const id of arguments[0]) {
  const el = document.getElementById(id);
  if (!el) { out[id] = null; continue; }
  const accordion = el.classList.contains('input-accordion') || el.classList.contains('gradio-accordion');
  out[id] = ((accordion && el.querySelector('.label-wrap')) || el).title;
}
return out;
"""

HOVER_JS = """
const el = document.getElementById(arguments[0]);
if (!el || el.offsetParent === null) return null;
const accordion = el.classList.contains('input-accordion') || el.classList.contains('gradio-accordion');
const box = ((accordion && el.querySelector('.label-wrap')) || el);
box.scrollIntoView({block: 'center'});
const r = box.getBoundingClientRect();
const hit = document.elementFromPoint(r.left + r.width / 2, r.top + Math.min(r.height / 2, 12));
if (!hit || !el.contains(hit)) return null;
const titled = hit.closest('[title]');
return titled ? titled.title : '';
"""

DISTANCE_JS = """
const done = arguments[arguments.length - 1];
function pixels(src) {
  return new Promise((ok, bad) => {
    const img = new Image();
    img.onload = () => { const c = document.createElement('canvas'); c.width = c.height = 32;
      const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0, 32, 32); ok(ctx.getImageData(0, 0, 32, 32).data); };
    img.onerror = () => bad(new Error('cannot load ' + src));
    img.src = src;
  });
}
Promise.all([pixels(arguments[0]), pixels(arguments[1])]).then(([a, b]) => {
  let sum = 0, n = 0;
  for (let i = 0; i < a.length; i += 4) { for (let j = 0; j < 3; j++) { sum += Math.abs(a[i + j] - b[i + j]); n++; } }
  done(sum / n);
}, e => done(-1));
"""

OPEN_TIME_JS = """
const done = arguments[arguments.length - 1];
const label = document.querySelector('#' + arguments[0] + ' .label-wrap');
const last = () => document.getElementById(arguments[1]);
label.scrollIntoView({block: 'center'});
const ready = () => label.classList.contains('open') && last().offsetParent !== null
  && last().getBoundingClientRect().height > 0;
const t0 = performance.now();
label.click();
(function poll() {
  if (ready()) requestAnimationFrame(() => done(performance.now() - t0));
  else if (performance.now() - t0 > 30000) done(-1);
  else requestAnimationFrame(poll);
})();
"""
