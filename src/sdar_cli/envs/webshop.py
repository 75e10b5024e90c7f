"""WebShopEnv: an HTTP client for a WebShop server (princeton-nlp/WebShop) that the user runs.

WebShop is a simulated online store (1.18M real products, 12,087 crowd-sourced instructions). Its
Flask app (`python -m web_agent_site.app`, port 3000) serves one page per URL:

    /<session_id>                                                  instruction + search box
    /search_results/<session_id>/<keywords>/<page>                 10 products per page
    /item_page/<session_id>/<asin>/<keywords>/<page>/<options>     options, price, tabs, Buy Now
    /item_sub_page/<session_id>/<asin>/<keywords>/<page>/<sub_page>/<options>
    /done/<session_id>/<asin>/<options>                            the purchase score, 0..1

A session id "fixed_<n>" plays goal n of the server's fixed goal order (WebShop convention: goals
0-499 test, 500-1499 eval, 1500+ train). The agent acts with `search[keywords]` or `click[value]`.
This client is a tiny browser: it follows the page's own links (product links, option radios'
data-url, each button's form), so it works with any version of WebShop's templates, and it turns
each page into WebShop's "simple" text observation: the visible text nodes joined by " [SEP] ".

    env = WebShopEnv(server_url="http://localhost:3000")
    task, obs = env.reset("fixed_0")
    obs = env.step("search[red cotton t-shirt]")
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from typing import Any, ClassVar

from .base import Environment, EnvironmentConfigError, Observation, Task
from .retry import with_retries

WIN_REWARD = 10.0
#: the admissible-action entry that stands for any search; step() accepts every search[...] action
SEARCH_ACTION = "search[<your query>]"
#: number of human-instruction goals of the full WebShop data (`./setup.sh -d all`)
FULL_DATA_GOALS = 12087
REWARD_MODES = ("success", "score")

SERVER_HELP = (
    "Start the real WebShop server on a machine with its data (Python 3.8, Java 11): "
    "git clone https://github.com/princeton-nlp/WebShop.git webshop && cd webshop && "
    "conda create -n webshop python=3.8.13 && conda activate webshop && ./setup.sh -d all && ./run_dev.sh "
    "(or: python -m web_agent_site.app --log --attrs); it listens on port 3000. "
    "Then set env.kwargs.server_url to its address. See docs/environments/webshop.md."
)

PROMPT_TEMPLATE = (
    "You are an expert shopping agent in WebShop, a simulated online store.\n"
    "Your task: {task}\n"
    "{history}"
    "You are now at step {step}. The current page shows: {observation}\n"
    "Your admissible actions on this page are: [{actions}].\n"
    "A search takes keywords of your choice, written like search[red cotton t-shirt].\n\n"
    "Think step by step about what the shopper asked for and which action gets you closer to buying it, "
    "inside <think> </think> tags. Then give exactly one admissible action inside <action> </action> tags."
)


class WebShopServerError(RuntimeError):
    """The WebShop server did not answer, or answered with an error or an unexpected page."""


# --------------------------------------------------------------------------------------------
# Task types: WebShop's products come from five store departments; an instruction names one.
# --------------------------------------------------------------------------------------------

TASK_TYPES: tuple[str, ...] = ("fashion", "beauty", "electronics", "home", "food", "other")

_CATEGORY_KEYWORDS: dict[str, tuple[str, ...]] = {
    "fashion": (
        "shirt", "t-shirt", "tshirt", "tee", "blouse", "top", "tank top", "dress", "jeans", "pants", "trousers",
        "shorts", "skirt", "jacket", "coat", "hoodie", "sweater", "sweatshirt", "cardigan", "vest", "blazer", "suit",
        "sock", "underwear", "bra", "panties", "boxer", "legging", "pajama", "swimsuit", "bikini", "romper",
        "jumpsuit", "tunic", "polo", "shoe", "sneaker", "boot", "sandal", "slipper", "heel", "loafer", "clog",
        "hat", "cap", "beanie", "scarf", "glove", "belt", "necklace", "bracelet", "earring", "jewelry", "handbag",
        "purse", "wallet", "sunglasses", "costume", "uniform", "sleeve", "machine wash", "fabric", "cotton",
        "polyester", "fit",
    ),
    "beauty": (
        "makeup", "lipstick", "lip", "gloss", "mascara", "eyeliner", "eyeshadow", "eye shadow", "foundation",
        "concealer", "blush", "nail", "polish", "perfume", "fragrance", "cologne", "shampoo", "conditioner", "hair",
        "wig", "serum", "moisturizer", "cream", "lotion", "sunscreen", "skin", "skincare", "facial", "cleanser",
        "toner", "soap", "body wash", "deodorant", "razor", "shaving", "beard", "toothpaste", "toothbrush", "teeth",
        "eyelash", "lash", "bath bomb", "essential oil", "manicure", "pedicure", "cosmetic", "paraben", "cruelty free",
    ),
    "electronics": (
        "headphone", "headset", "earbud", "earphone", "speaker", "bluetooth", "usb", "charger", "charging", "cable",
        "hdmi", "adapter", "battery", "laptop", "computer", "tablet", "ipad", "iphone", "phone", "smartphone",
        "camera", "lens", "tripod", "tv", "television", "monitor", "keyboard", "mouse", "router", "wifi", "wireless",
        "remote", "projector", "microphone", "screen protector", "power bank", "smartwatch", "gaming", "controller",
        "drone", "stereo", "amplifier", "memory card", "hard drive", "ssd", "electronic", "4k", "hd",
    ),
    "home": (
        "chair", "table", "desk", "sofa", "couch", "bed", "mattress", "pillow", "cushion", "blanket", "sheet",
        "duvet", "comforter", "curtain", "rug", "carpet", "lamp", "shelf", "bookcase", "cabinet", "dresser",
        "nightstand", "ottoman", "bench", "stool", "mirror", "picture frame", "wall art", "poster", "canvas", "vase",
        "candle", "clock", "storage", "organizer", "basket", "towel", "bath mat", "kitchen", "cookware", "pan",
        "furniture", "living room", "bedroom", "dining room", "decor", "wallpaper", "planter", "home",
    ),
    "food": (
        "snack", "chocolate", "candy", "cookie", "cracker", "chips", "coffee", "tea", "juice", "drink", "beverage",
        "soda", "sauce", "spice", "seasoning", "salt", "sugar", "honey", "syrup", "nut", "almond", "peanut", "jerky",
        "cheese", "milk", "protein", "gluten free", "gluten-free", "sugar free", "keto", "flour", "pasta", "rice",
        "noodle", "soup", "cereal", "oatmeal", "granola", "gum", "popcorn", "fruit", "bread", "cake", "vinegar",
        "kosher", "grocery", "food", "flavor", "low carb", "non gmo", "vegan", "organic",
    ),
}

_KEYWORD_PATTERNS: dict[str, re.Pattern[str]] = {
    category: re.compile(
        r"(?<![a-z0-9])(?:" + "|".join(re.escape(k) for k in sorted(words, key=len, reverse=True)) + r")(?:s|es)?(?![a-z0-9])"
    )
    for category, words in _CATEGORY_KEYWORDS.items()
}


def task_type_of(instruction: str) -> str:
    """The store department an instruction asks about, from its keywords ("other" when none match).

    The category with the most keyword hits wins; a tie goes to the one mentioned first.
    """
    text = instruction.lower()
    best: tuple[int, int, str] | None = None
    for category, pattern in _KEYWORD_PATTERNS.items():
        hits = [m.start() for m in pattern.finditer(text)]
        if hits and (best is None or (len(hits), -hits[0]) > (best[0], best[1])):
            best = (len(hits), -hits[0], category)
    return best[2] if best else "other"


# --------------------------------------------------------------------------------------------
# HTML -> page: visible text nodes and clickables, as WebShop's text environment reads them.
# --------------------------------------------------------------------------------------------

_INVISIBLE_TAGS = frozenset({"style", "script", "head", "title", "meta", "noscript", "template"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
                        "wbr"})


class _Element:
    __slots__ = ("attrs", "hidden", "serial", "tag")

    def __init__(self, tag: str, attrs: dict[str, str], hidden: bool, serial: int) -> None:
        self.tag, self.attrs, self.hidden, self.serial = tag, attrs, hidden, serial


class _Clickable:
    """Where a click goes: a GET of a link or a POST of a button's form."""

    __slots__ = ("method", "url")

    def __init__(self, method: str, url: str) -> None:
        self.method, self.url = method, url


class _PageParser(HTMLParser):
    """One pass over a WebShop page with the standard library's HTML parser.

    Collects the visible text runs (what BeautifulSoup's `find_all(text=True)` filtered by WebShop's
    `tag_visible` gives, minus whitespace-only runs and elements hidden with `display:none` or
    `hidden`), the buttons (class "btn"), product links (class "product-link"), option radios,
    the search form, the instruction and the done page's score.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[_Element] = []
        self.serial = 0
        self.texts: list[str] = []
        self.buttons: list[tuple[str, _Clickable | None]] = []
        self.links: list[tuple[str, _Clickable | None]] = []
        self.radios: list[tuple[str, _Clickable | None]] = []
        self.search_form: str | None = None  # the action URL of the form holding #search_input
        self.search_field = "search_query"
        self.instruction_runs: list[str] = []
        self.score_runs: list[str] = []
        self.reward_runs: list[str] = []
        self._form: tuple[str, str] | None = None  # (action, method) of the open form
        self._captures: list[tuple[_Element, list[str], str, _Clickable | None]] = []
        self._instruction_h4: int | None = None  # serial of the first h4 inside #instruction-text

    # -- tree bookkeeping ------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        hidden_attr = "hidden" in attributes or "display:none" in attributes.get("style", "").replace(" ", "").lower()
        parent_hidden = bool(self.stack) and self.stack[-1].hidden
        self.serial += 1
        element = _Element(tag, attributes, parent_hidden or hidden_attr or tag in _INVISIBLE_TAGS, self.serial)
        classes = attributes.get("class", "").split()
        if tag == "form":
            self._form = (attributes.get("action", ""), attributes.get("method", "get").lower())
        if tag == "input":
            self._input(attributes)
        if tag == "h4" and self._instruction_h4 is None and self._inside_id("instruction-text"):
            self._instruction_h4 = element.serial
        if "btn" in classes and tag == "input":  # <input class="btn" value="..."> has no text of its own
            self.buttons.append((" ".join(attributes.get("value", "").split()), self._button_target(tag, attributes)))
        elif "btn" in classes:
            self._captures.append((element, [], "button", self._button_target(tag, attributes)))
        elif "product-link" in classes:
            self._captures.append((element, [], "link", _Clickable("get", attributes.get("href", ""))))
        if tag not in _VOID_TAGS:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS and self.stack and self.stack[-1].tag == tag:
            self._close(len(self.stack) - 1)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        # a stray end tag (WebShop's templates have <h4>...</h5>) closes nothing, like html.parser in bs4
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index].tag == tag:
                self._close(index)
                return

    def _close(self, index: int) -> None:
        closing = {element.serial for element in self.stack[index:]}
        del self.stack[index:]
        still_open = []
        for element, runs, kind, target in self._captures:
            if element.serial in closing:
                text = " ".join(" ".join(runs).split())
                (self.buttons if kind == "button" else self.links).append((text, target))
            else:
                still_open.append((element, runs, kind, target))
        self._captures = still_open

    def _inside_id(self, element_id: str) -> bool:
        return any(element.attrs.get("id") == element_id for element in self.stack)

    def _input(self, attributes: dict[str, str]) -> None:
        if attributes.get("id") == "search_input":
            self.search_form = self._form[0] if self._form else ""
            self.search_field = attributes.get("name", "search_query")
        elif attributes.get("type", "").lower() == "radio":
            url = attributes.get("data-url", "")
            self.radios.append((attributes.get("value", ""), _Clickable("get", url) if url else None))

    def _button_target(self, tag: str, attributes: dict[str, str]) -> _Clickable | None:
        if tag == "a":
            return _Clickable("get", attributes.get("href", ""))
        if self._form is None:
            return None
        action, method = self._form
        return _Clickable("post" if method == "post" else "get", action)

    # -- text ------------------------------------------------------------------------------

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if not text:
            return
        visible = not (self.stack and self.stack[-1].hidden)
        if visible:
            self.texts.append(text)
            for _, runs, _, _ in self._captures:
                runs.append(text)
        if self._instruction_h4 is not None and any(e.serial == self._instruction_h4 for e in self.stack):
            self.instruction_runs.append(text)
        if self._inside_id("reward"):
            self.reward_runs.append(text)
            if any(element.tag == "pre" for element in self.stack):
                self.score_runs.append(text)


class _Page:
    """A parsed WebShop page: its text observation, clickables, search form, instruction, score."""

    def __init__(self, url: str, html: str) -> None:
        parser = _PageParser()
        parser.feed(html)
        parser.close()
        self.url = url
        self.texts = parser.texts
        instruction = " ".join(parser.instruction_runs)
        self.instruction = re.sub(r"^\s*instruction:\s*", "", instruction, flags=re.IGNORECASE).strip()
        self.search_url = urllib.parse.urljoin(url, parser.search_form) if parser.search_form is not None else None
        self.search_field = parser.search_field
        self.score = _parse_score(parser.score_runs, parser.reward_runs)
        self.is_done = self.score is not None or "/done/" in urllib.parse.urlsplit(url).path
        # WebShop's order: buttons and product links by their lower-cased text, then option values;
        # a repeated name keeps its first place and its last target (a dict, as in WebShop)
        clickables: dict[str, _Clickable] = {}
        for text, target in parser.buttons + parser.links:
            name = text.lower()
            if target is None or not name or (name == "search" and self.search_url is not None):
                continue  # the search form's own submit button: search[...] is the way to use it
            clickables[name] = _Clickable(target.method, urllib.parse.urljoin(url, target.url))
        for value, target in parser.radios:
            value = " ".join(value.split())
            if target is not None and value:
                clickables[value] = _Clickable(target.method, urllib.parse.urljoin(url, target.url))
        self.clickables = clickables
        self._by_lower = {name.lower(): target for name, target in reversed(clickables.items())}

    def clickable(self, name: str) -> _Clickable | None:
        """The target of click[name]: exact, else case-insensitive (WebShop lower-cases what it clicks)."""
        return self.clickables.get(name) or self._by_lower.get(name.lower())

    def admissible_actions(self) -> list[str]:
        if self.is_done:
            return []
        actions = [SEARCH_ACTION] if self.search_url is not None else []
        return actions + [f"click[{name}]" for name in self.clickables]

    def text(self) -> str:
        """The page's text observation, without the header and instruction every page repeats (the
        prompt already holds the task), as verl-agent's WebShop manager does."""
        parts = self.texts
        if self.instruction:
            wanted = {_norm(self.instruction), _norm("Instruction: " + self.instruction)}
            for index, part in enumerate(parts):
                if _norm(part) in wanted:
                    parts = parts[index + 1:]
                    break
        return " [SEP] ".join(parts)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _parse_score(score_runs: list[str], reward_runs: list[str]) -> float | None:
    """The done page's score: the number in <pre> inside #reward (else the last number there)."""
    for runs in (score_runs, reward_runs):
        numbers = re.findall(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ".join(runs))
        if numbers:
            return float(numbers[-1])
    return None


# --------------------------------------------------------------------------------------------
# HTTP: every request has a timeout, a few retries with backoff, then WebShopServerError.
# --------------------------------------------------------------------------------------------

_SAFE_URL_CHARS = ":/?#[]@!$&'()*+,;=%~"
_RETRY_STATUS = frozenset({502, 503, 504})
# a local WebShop server must never be reached through an http_proxy set for the internet
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fetch(method: str, url: str, form: dict[str, str] | None, timeout: float, retries: int,
           backoff: float) -> tuple[str, str]:
    """(final URL after redirects, HTML) of one request; WebShopServerError after `retries` retries.

    Retries: connection errors, timeouts and HTTP 502/503/504, after backoff * 2**attempt seconds.
    Other HTTP errors (a 500 from a goal index the server lacks) are raised at once.
    """
    url = urllib.parse.quote(url, safe=_SAFE_URL_CHARS)
    data = urllib.parse.urlencode(form).encode() if form is not None else (b"" if method == "post" else None)

    def once() -> tuple[str, str]:
        request = urllib.request.Request(url, data=data, method=method.upper())
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                body = _read_within(response, time.monotonic() + timeout)
                charset = response.headers.get_content_charset() or "utf-8"
                return response.geturl(), body.decode(charset, errors="replace")
        except urllib.error.HTTPError as err:
            if err.code not in _RETRY_STATUS:
                raise WebShopServerError(f"{method.upper()} {url} answered HTTP {err.code} {err.reason}") from None
            raise _TransientFailure(f"HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            raise _TransientFailure("no answer within the timeout" if isinstance(reason, TimeoutError) else str(reason)) from None

    try:
        return with_retries(once, retries, backoff, (_TransientFailure,))
    except _TransientFailure as err:
        raise WebShopServerError(
            f"{method.upper()} {url} failed after {retries + 1} attempt(s) with a {timeout:g} s timeout each: {err}"
        ) from None


class _TransientFailure(Exception):
    """A failed request worth trying again (connection error, timeout, HTTP 502/503/504)."""


def _read_within(response: http.client.HTTPResponse, deadline: float) -> bytes:
    """The whole body, or TimeoutError when a server that trickles bytes passes the deadline."""
    chunks = []
    while chunk := response.read1(65536):  # read1: at most one socket read, so the deadline is checked often
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the response took longer than the timeout")
    return b"".join(chunks)


# Servers already checked by this process: (url, number of goals). Construction is frequent (one
# environment object per episode slot), so the check runs once per server and configuration.
_CHECKED_SERVERS: set[tuple[str, int]] = set()
_CHECK_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# The environment.
# --------------------------------------------------------------------------------------------


def _number(name: str, value: object, low: float, integer: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < low:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind} >= {low}, got {value!r}")
    return value


class WebShopEnv(Environment):
    """WebShop through its HTTP server: search and click until Buy Now, scored 0..1 by the server.

    Task ids are the server's session ids "fixed_<n>" (goal n). Rewards arrive on the buy step:
    reward_mode "success" (default, the paper's): WIN_REWARD when the score is 1, else 0;
    "score": WIN_REWARD * score. `won` means score 1. `score` holds the last purchase's score.
    An action that is not search[...] or a click on the page changes nothing and returns the same
    page (WebShop's own behaviour). No expert plan exists: `privileged` is empty, skills are the
    teacher's context.
    """

    max_turns: int = 15
    skill_bank: ClassVar[str | None] = "webshop"
    rollout_defaults: ClassVar[dict[str, Any]] = {
        "history_turns": 2,
        "max_new_tokens": 512,
        "max_prompt_tokens": 4096,
        "invalid_action_penalty": 0.1,
        # official: invalid only by format, and every parsed action is played ("Nothing happens." if inadmissible)
        "invalid_action": "format",
        "action_pattern": r"<action>(.*?)</action>",
        "stop_strings": ["</action>"],
        "prompt_template": PROMPT_TEMPLATE,
    }

    def __init__(self, server_url: str = "http://localhost:3000", num_goals: int = FULL_DATA_GOALS,
                 split_ranges: dict[str, list[int]] | None = None, timeout: float = 60.0, retries: int = 2,
                 backoff: float = 1.0, startup_timeout: float = 300.0, reward_mode: str = "success") -> None:
        parsed = urllib.parse.urlsplit(str(server_url))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server_url must look like http://host:3000, got {server_url!r}")
        self.server_url = str(server_url).rstrip("/")
        self.num_goals = _number("num_goals", num_goals, 1, integer=True)
        self.timeout = _number("timeout", timeout, 0.001)
        self.retries = _number("retries", retries, 0, integer=True)
        self.backoff = _number("backoff", backoff, 0)
        self.startup_timeout = _number("startup_timeout", startup_timeout, 0.001)
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {', '.join(REWARD_MODES)}, got {reward_mode!r}")
        self.reward_mode = reward_mode
        self.split_ranges = self._ranges(split_ranges)
        self.score: float | None = None
        self._page: _Page | None = None
        self._check_server()

    # -- configuration ---------------------------------------------------------------------

    def _ranges(self, split_ranges: dict[str, list[int]] | None) -> dict[str, tuple[int, int]]:
        if split_ranges is None:  # WebShop's convention, cut to the goals the server has
            n = self.num_goals
            return {"test": (0, min(500, n)), "eval": (min(500, n), min(1500, n)), "train": (min(1500, n), n)}
        if not isinstance(split_ranges, dict) or not split_ranges:
            raise ValueError("split_ranges must map split names to [start, end) goal ranges, e.g. {train: [1500, 12087]}")
        ranges = {}
        for split, bounds in split_ranges.items():
            if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
                    or not 0 <= bounds[0] < bounds[1] <= self.num_goals):
                raise ValueError(f"split_ranges.{split} must be [start, end) with 0 <= start < end <= num_goals "
                                 f"({self.num_goals}), got {bounds!r}")
            ranges[str(split)] = (bounds[0], bounds[1])
        return ranges

    def _check_server(self) -> None:
        key = (self.server_url, self.num_goals)
        with _CHECK_LOCK:
            if key not in _CHECKED_SERVERS:
                self._probe()
                _CHECKED_SERVERS.add(key)

    def _probe(self) -> None:
        """Fail construction with the fix when the server is down, is not WebShop, or has fewer goals."""
        parsed = urllib.parse.urlsplit(self.server_url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as err:
            raise EnvironmentConfigError(
                f"No WebShop server answers at {self.server_url} ({err}). {SERVER_HELP}"
            ) from None
        first = self._session_url(0)
        try:
            url, html = _fetch("get", first, None, self.startup_timeout, 0, 0)
        except WebShopServerError as err:
            raise EnvironmentConfigError(
                f"The WebShop server at {self.server_url} accepted a connection but {first} failed: {err}. "
                "A freshly started WebShop loads its products and search index on the first request (minutes with "
                f"the full data): open {first} once, wait for the page, then start again, or raise "
                "env.kwargs.startup_timeout."
            ) from None
        page = _Page(url, html)
        if page.search_url is None or not page.instruction:
            raise EnvironmentConfigError(
                f"{first} answered, but not with WebShop's search page (no instruction and search box): is "
                f"{self.server_url} really a WebShop server? {SERVER_HELP}"
            )
        if not self._has_goal(self.num_goals - 1):
            count = self._count_goals()
            raise EnvironmentConfigError(
                f"The WebShop server at {self.server_url} serves {count} goals (fixed_0 .. fixed_{count - 1}), fewer "
                f"than num_goals = {self.num_goals} (the full data, ./setup.sh -d all, has {FULL_DATA_GOALS}). Set "
                f"env.kwargs.num_goals: {count} (and split_ranges if the default 0-499 test / 500-1499 eval / 1500+ "
                "train does not fit)."
            )

    def _has_goal(self, index: int) -> bool:
        try:
            _fetch("get", self._session_url(index), None, self.timeout, self.retries, self.backoff)
        except WebShopServerError:
            return False
        return True

    def _count_goals(self) -> int:
        """The server's goal count by bisection: fixed_0 exists, fixed_<num_goals - 1> does not."""
        low, high = 0, self.num_goals - 1  # low exists, high does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self._has_goal(middle) else (low, middle)
        return low + 1

    def _session_url(self, index: int) -> str:
        return f"{self.server_url}/fixed_{index}"

    # -- task ids --------------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        if split not in self.split_ranges:
            raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(self.split_ranges)}")
        start, end = self.split_ranges[split]
        return [f"fixed_{i}" for i in range(start, end)]

    def _goal_index(self, task_id: str) -> int:
        match = re.fullmatch(r"fixed_(\d+)", str(task_id))
        if match is None or int(match.group(1)) >= self.num_goals:
            raise ValueError(f"unknown task id {task_id!r}; WebShop task ids run fixed_0 .. fixed_{self.num_goals - 1}")
        return int(match.group(1))

    # -- episodes --------------------------------------------------------------------------

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        index = self._goal_index(task_id)
        self.score = None
        self._page = self._load("get", self._session_url(index), None)
        if not self._page.instruction or self._page.search_url is None:
            raise WebShopServerError(f"{self._session_url(index)} did not show WebShop's search page")
        instruction = self._page.instruction
        return Task(task_id=task_id, task_type=task_type_of(instruction), description=instruction), self._observe()

    def step(self, action: str) -> Observation:
        page = self._require_page()
        if page.is_done:
            return self._observe()
        match = re.fullmatch(r"\s*(search|click)\s*\[(.*)\]\s*", str(action), re.IGNORECASE | re.DOTALL)
        if match is None:
            return self._observe()
        verb, argument = match.group(1).lower(), " ".join(match.group(2).split())
        if verb == "search":
            if page.search_url is None or not argument or argument.lower() == "<your query>":
                return self._observe()
            self._page = self._load("post", page.search_url, {page.search_field: argument})
        else:
            target = page.clickable(argument)
            if target is None:
                return self._observe()
            self._page = self._load(target.method, target.url, {} if target.method == "post" else None)
        if not self._page.is_done:
            return self._observe()
        if self._page.score is None:
            raise WebShopServerError(f"{self._page.url}: the purchase page shows no score")
        self.score = self._page.score
        won = self.score >= 1.0 - 1e-9
        if self.reward_mode == "success":
            reward = WIN_REWARD if won else 0.0
        else:
            reward = WIN_REWARD * self.score
        return self._observe(reward=reward, won=won)

    def _load(self, method: str, url: str, form: dict[str, str] | None) -> _Page:
        final_url, html = _fetch(method, url, form, self.timeout, self.retries, self.backoff)
        return _Page(final_url, html)

    def _require_page(self) -> _Page:
        if self._page is None:
            raise RuntimeError("call reset(task_id) before step()")
        return self._page

    def _observe(self, reward: float = 0.0, won: bool = False) -> Observation:
        page = self._require_page()
        return Observation(text=page.text(), admissible_actions=page.admissible_actions(), reward=reward,
                           done=page.is_done, won=won)
