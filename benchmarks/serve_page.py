"""The chat page in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium loads the page a running `run.py serve` shows, sends a message and waits for
the streamed reply; tests/test_serve.py uses it, and run as a script it saves a screenshot.

  python run.py serve --workdir=runs/p46/sft --port=8000 &
  python -m benchmarks.serve_page --url=http://localhost:8000 --temperature=0 \
      --message="Write planet in capital letters." --message="Reverse the word garden." \
      --out=docs/results/serving/chat_page.png
"""
import os
import shutil
import tempfile

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'


def available() -> str | None:
  """None when a browser test can run here, else why not."""
  try:
    import selenium  # noqa: F401
  except ImportError:
    return 'selenium is not installed (pip install -r requirements-test.txt)'
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.path.exists(path):
      return f'{path} is missing (apt-get install chromium chromium-driver)'
  return None


def chromium(width: int = 1100, height: int = 720):
  """A headless Chromium that makes no connections of its own (a closed network refuses them)."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix='lm-chromium-')
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
              '--no-first-run', '--disable-background-networking', '--disable-component-update',
              '--disable-sync', '--disable-quic', f'--window-size={width},{height}',
              f'--user-data-dir={profile}'):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.lm_profile = profile
  return driver


def quit(driver) -> None:
  driver.quit()
  shutil.rmtree(driver.lm_profile, ignore_errors=True)


def chat(driver, url: str, messages: list[str], api_key: str = '',
         temperature: float | None = None, system: str = '', timeout: float = 60.0) -> dict:
  """Loads the page, sends each message in turn, waiting for each reply to finish streaming.
  Returns the replies' texts, how many times the page updated the conversation while it
  streamed, and the page's errors."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  driver.get(url)
  wait = WebDriverWait(driver, timeout)
  if api_key:
    driver.execute_script('localStorage.setItem("lm_api_key", arguments[0]);', api_key)
    driver.get(url)
  wait.until(lambda d: d.execute_script('return state.model !== null'))
  if temperature is not None:
    driver.execute_script('document.getElementById("temperature").value = arguments[0];',
                          str(temperature))
  if system:
    driver.find_element(By.ID, 'system').send_keys(system)
  # Count the reply's updates: more than one means it arrived in pieces.
  driver.execute_script('''
    window.lmUpdates = 0;
    new MutationObserver(() => { window.lmUpdates += 1; }).observe(
        document.getElementById("messages"), {subtree: true, characterData: true,
                                               childList: true});''')
  for k, message in enumerate(messages, 1):
    driver.find_element(By.ID, 'input').send_keys(message)
    driver.find_element(By.ID, 'send').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '.msg.assistant.done')) >= k)
  replies = driver.execute_script(
      'return Array.from(document.querySelectorAll(".msg.assistant.done"), m => m.textContent);')
  errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, '.error')]
  return {'replies': replies, 'updates': driver.execute_script('return window.lmUpdates;'),
          'errors': errors}


def _wait_until_up(url: str, seconds: float = 300.0) -> None:
  """Waits for the server's /health (it compiles its decoder before it listens)."""
  import time
  import urllib.error
  import urllib.request
  end = time.time() + seconds
  while True:
    try:
      with urllib.request.urlopen(url.rstrip('/') + '/health', timeout=5):
        return
    except (urllib.error.URLError, OSError):
      if time.time() > end:
        raise SystemExit(f'error: no server answered at {url} within {seconds:.0f} s; start one '
                         'with python run.py serve --workdir=RUN.')
      time.sleep(1)


def main():
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--url', default='http://localhost:8000')
  p.add_argument('--message', action='append', help='a message to send (repeat for more)')
  p.add_argument('--api_key', default='')
  p.add_argument('--temperature', type=float, default=None)
  p.add_argument('--out', default='chat_page.png')
  args = p.parse_args()
  why = available()
  if why:
    raise SystemExit(f'error: {why}.')
  _wait_until_up(args.url)
  driver = chromium()
  try:
    got = chat(driver, args.url, args.message or ['Hello!'], args.api_key, args.temperature)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    driver.save_screenshot(args.out)
  finally:
    quit(driver)
  for reply in got['replies']:
    print(f'reply: {reply!r}')
  print(f"{got['updates']} page updates while streaming")
  if got['errors']:
    print('page errors:', got['errors'])
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
