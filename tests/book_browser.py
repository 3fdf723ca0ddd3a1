"""A headless-Chromium check of a built Jupyter Book (``<out>/_build/html``).

``check_book(html_dir, screenshots, forbidden)`` serves ``html_dir`` on 127.0.0.1 and loads every page
in Chromium (Debian's ``/usr/bin/chromium`` driven by Playwright; no browser download): each image
loaded, no error/traceback or stderr output cell, every internal link (anchors to other pages included)
reaches an existing page, no page text shows a build-machine path, and the search page finds a word of
the book.  It returns a report whose ``problems`` are one line each, ``"page: what"``.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urldefrag, urlsplit

__all__ = ["CHROMIUM", "BrowserMissing", "check_book"]

CHROMIUM = os.environ.get("MICROLM_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium waits on the (unreachable) update/sync services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGE_TIMEOUT_MS = 60_000  # a page holding a big notebook, on a busy 2-core machine
SKIP_DIRS = {"_static", "_sources", "_images"}


class BrowserMissing(RuntimeError):
    """Chromium or Playwright is not installed (one-line message naming the install command)."""


# In the page: wait for every image (lazy ones made eager), then report what did not load.
_IMAGES_JS = """async (ms) => {
  const imgs = Array.from(document.images);
  for (const i of imgs) if (i.loading === 'lazy') i.loading = 'eager';
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => {
    i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, ms); })));
  return imgs.filter(i => !(i.complete && i.naturalWidth > 0))
             .map(i => ({src: i.getAttribute('src') || '', url: i.currentSrc || i.src}));
}"""

# Everything the checks read from one page, in one round trip.
_PAGE_JS = """() => {
  const text = el => ((el.querySelector('pre') || el).textContent || '').replace(/\\s+/g, ' ').trim();
  const TB = 'div.output.traceback, div.output.error';
  const errors = Array.from(document.querySelectorAll(TB)).concat(
    Array.from(document.querySelectorAll('.cell_output'))
      .filter(e => /Traceback/.test(e.textContent) && !e.querySelector(TB)));
  const stderr = Array.from(document.querySelectorAll('div.output.stderr'));
  const links = Array.from(document.querySelectorAll('a[href]'))
    .map(a => ({raw: a.getAttribute('href'), url: a.href}));
  const ids = Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name'));
  const parts = [];
  const walker = document.createTreeWalker(document.body || document.documentElement, NodeFilter.SHOW_TEXT, {
    acceptNode: n => n.parentElement && n.parentElement.closest('script, style, noscript, template')
      ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT});
  while (walker.nextNode()) parts.push(walker.currentNode.nodeValue);
  for (const e of document.querySelectorAll('[href], [src], [alt], [title]'))
    for (const a of ['href', 'src', 'alt', 'title']) if (e.hasAttribute(a)) parts.push(e.getAttribute(a));
  parts.push(document.title);
  return {errors: errors.map(text), stderr: stderr.map(text), links, ids,
          text: parts.join(' ').replace(/\\s+/g, ' ')};
}"""


def _serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True, name="book-http").start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def _launch(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=120_000)


def _short(s: str, n: int = 100) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _pages(html_dir: Path) -> list[str]:
    """Every .html page of the book, as a path relative to ``html_dir`` (POSIX), index first."""
    pages = [p.relative_to(html_dir).as_posix() for p in sorted(html_dir.rglob("*.html"))
             if not SKIP_DIRS & set(p.relative_to(html_dir).parts[:-1])]
    return sorted(pages, key=lambda p: (p != "index.html", p))


def _search_word(html_dir: Path) -> str:
    """A word the search must find: the longest Latin word of the first chapter's title (else of the
    first other page title that has one)."""
    pages = sorted(_pages(html_dir), key=lambda p: not p.startswith("notebooks/"))
    for page in pages:
        m = re.search(r"<h1[^>]*>(.*?)</h1>", (html_dir / page).read_text(encoding="utf-8"), re.S)
        words = re.findall(r"[A-Za-z]{4,}", re.sub(r"<[^>]+>", " ", m.group(1))) if m else []
        if words:
            return max(words, key=len)
    return "the"


def check_book(html_dir: Path, screenshots: Path | None, forbidden: list[str], *,
               query: str | None = None) -> dict:
    """Load every page of the built book in headless Chromium and check it.

    ``html_dir`` is ``<out>/_build/html``; ``screenshots``, when given, receives full-page PNGs of the root
    page, the first chapter (``notebooks/*.html``) and ``results.html`` (if the book has one);
    ``forbidden`` are strings no page may show (the build machine's absolute paths).  ``query`` is the
    word the search page must find (default: a word of the first chapter's title).

    Returns ``{"pages": [...], "problems": ["page: what", ...], "screenshots": [...], "search": {...},
    "js_errors": [...]}``; an empty ``problems`` is a pass (``js_errors``, uncaught exceptions of the
    theme's scripts, are for reading only: sphinx-thebe 0.3 raises one on every page).  Raises
    ``BrowserMissing`` (one line) when Chromium or Playwright is not installed.
    """
    try:
        from playwright.sync_api import Error as PwError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise BrowserMissing(f"playwright is not installed ({e}): pip install -e '.[dev]' "
                             "(and apt-get install chromium; no `playwright install`)") from None
    if not Path(CHROMIUM).is_file():
        raise BrowserMissing(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"no built book at {html_dir} (index.html missing)")
    forbidden = sorted({f for f in forbidden if f}, key=len, reverse=True)
    pages = _pages(html_dir)
    first_chapter = next((p for p in pages if p.startswith("notebooks/")), None)
    results_page = next((p for p in pages if p.rsplit("/", 1)[-1] == "results.html"), None)
    shots = {"index.html", first_chapter, results_page} - {None} if screenshots is not None else set()
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)

    problems: list[str] = []
    js_errors: list[str] = []
    saved: list[str] = []
    ids: dict[str, set[str]] = {}  # page -> its element ids (for anchors into it)
    links: dict[str, list[tuple[str, str]]] = {}  # page -> [(href as written, absolute url)]
    status: dict[str, int] = {}  # url without fragment -> HTTP status

    srv, base = _serve(html_dir)

    def http_status(url: str) -> int:
        if url not in status:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                    status[url] = r.status
            except urllib.error.HTTPError as e:
                status[url] = e.code
            except OSError:
                status[url] = 0
        return status[url]

    def page_of(url: str) -> str | None:
        """The book-relative path a same-origin url names (``x/`` -> ``x/index.html``), else None."""
        if not url.startswith(base):
            return None
        path = unquote(urlsplit(url).path).lstrip("/")
        return path + "index.html" if path.endswith("/") or not path else path

    try:
        with sync_playwright() as pw:
            browser = _launch(pw)
            ctx = browser.new_context(viewport={"width": 1280, "height": 900})
            ctx.set_default_timeout(PAGE_TIMEOUT_MS)
            ctx.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
            # Offline and deterministic: only the local server answers (a CDN script fails at once).
            ctx.route(re.compile(r"^(?!http://127\.0\.0\.1:).*"), lambda route: route.abort())
            page = ctx.new_page()
            current = {"page": ""}
            missing_res: dict[str, set[str]] = {}
            page.on("pageerror", lambda e: js_errors.append(f"{current['page']}: {_short(str(e), 200)}"))

            def on_response(r):
                if r.url.startswith(base) and r.status >= 400 and r.request.resource_type in (
                        "stylesheet", "script", "font") and not r.url.endswith("favicon.ico"):
                    missing_res.setdefault(current["page"], set()).add(page_of(r.url) or r.url)

            page.on("response", on_response)

            for rel in pages:
                current["page"] = rel
                try:
                    resp = page.goto(base + rel, wait_until="load")
                except PwError as e:
                    problems.append(f"{rel}: did not load: {_short(str(e).splitlines()[0])}")
                    continue
                if resp is not None and resp.status >= 400:
                    problems.append(f"{rel}: HTTP {resp.status}")
                    continue
                if re.search(r'http-equiv="refresh"', (html_dir / rel).read_text(encoding="utf-8", errors="replace"),
                             re.I):  # index.html: a meta refresh to the root page
                    try:
                        page.wait_for_url(lambda u, rel=rel: urldefrag(u)[0] != base + rel)
                        page.wait_for_load_state("load")
                    except PwError as e:
                        problems.append(f"{rel}: its redirect did not load: {_short(str(e).splitlines()[0])}")
                        continue
                bad_imgs = page.evaluate(_IMAGES_JS, PAGE_TIMEOUT_MS // 2)
                bad_imgs = [b for b in bad_imgs  # an SVG may have no intrinsic width: trust HTTP 200
                            if not (b["url"].split("?")[0].endswith(".svg") and http_status(b["url"]) == 200)]
                if bad_imgs:
                    problems.append(f"{rel}: {len(bad_imgs)} image(s) not loaded: "
                                    + ", ".join(_short(b["src"], 80) for b in bad_imgs[:5]))
                info = page.evaluate(_PAGE_JS)
                if info["errors"]:
                    problems.append(f"{rel}: {len(info['errors'])} error/traceback output(s): "
                                    f"{_short(info['errors'][0])!r}")
                if info["stderr"]:
                    problems.append(f"{rel}: {len(info['stderr'])} stderr output(s): {_short(info['stderr'][0])!r}")
                found = [f for f in forbidden if f in info["text"]]
                if found:
                    text = info["text"]
                    i = text.index(found[0])
                    snippet = text[max(0, i - 40): i + len(found[0]) + 40]
                    problems.append(f"{rel}: build-machine path(s) {found} in the text: …{_short(snippet, 200)}…")
                if rel in missing_res:
                    problems.append(f"{rel}: missing resource(s): {', '.join(sorted(missing_res[rel]))}")
                shown = page_of(page.url.split("#")[0]) or rel  # index.html shows the root page
                ids[rel] = ids[shown] = set(info["ids"])
                links[rel] = [(lk["raw"], lk["url"]) for lk in info["links"]]
                if rel in shots:
                    name = ("index" if rel == "index.html" else rel.removesuffix(".html")).replace("/", "_")
                    out = screenshots / f"{name}.png"
                    page.screenshot(path=str(out), full_page=True, timeout=PAGE_TIMEOUT_MS * 2)
                    saved.append(str(out))

            # Internal links: relative hrefs (no scheme, not protocol-relative) to this server.
            for rel, lks in links.items():
                broken = []
                for raw, url in lks:
                    if not raw or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", raw) or raw.startswith("//"):
                        continue
                    if not url.startswith(base):
                        broken.append(raw)
                        continue
                    target, frag = urldefrag(url)
                    if raw.startswith("#"):  # an anchor of this page
                        if frag and unquote(frag) not in ids.get(rel, set()):
                            broken.append(raw)
                        continue
                    if http_status(target) != 200:
                        broken.append(raw)
                    elif frag and (tp := page_of(target)) in ids and unquote(frag) not in ids[tp]:
                        broken.append(raw)
                if broken:
                    broken = sorted(set(broken))
                    problems.append(f"{rel}: {len(broken)} broken internal link(s): "
                                    + ", ".join(_short(b, 80) for b in broken[:8]))

            # The search page finds a word of the book (Sphinx renders the hits as ul.search li).
            word = query or _search_word(html_dir)
            search = {"query": word, "results": 0}
            if "search.html" not in pages:
                problems.append("search.html: no search page in the book")
            else:
                current["page"] = "search.html"
                try:
                    page.goto(f"{base}search.html?q={quote(word)}", wait_until="load")
                    page.wait_for_selector("ul.search li", timeout=PAGE_TIMEOUT_MS)
                    search["results"] = page.locator("ul.search li").count()
                except PwError as e:
                    problems.append(f"search.html: no result for {word!r}: {_short(str(e).splitlines()[0])}")
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    seen: dict[str, list[str]] = {}  # one line per distinct uncaught JS error (sphinx-thebe's is on every page)
    for e in js_errors:
        page_name, _, msg = e.partition(": ")
        seen.setdefault(msg, []).append(page_name)
    return {"pages": pages, "problems": problems, "screenshots": saved, "search": search,
            "js_errors": [f"{m} (on {len(set(ps))} page(s), first {ps[0]})" for m, ps in seen.items()]}
