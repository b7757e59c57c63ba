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
