"""A small fake WebShop server for the tests: the real server's routes and page shapes, a toy catalogue.

It answers the URLs princeton-nlp/WebShop's Flask app answers, with pages built like its templates
(the ids, classes, forms, buttons and option radios WebShopEnv reads), so the client runs through
its real HTTP and HTML-parsing code:

    GET/POST /<session_id>                       search page; POST search_query -> 302 to results
    /search_results/<session_id>/<keywords>/<page>
    /item_page/<session_id>/<asin>/<keywords>/<page>/<options>
    /item_sub_page/<session_id>/<asin>/<keywords>/<page>/<sub_page>/<options>
    /done/<session_id>/<asin>/<options>          "Your score (min 0.0, max 1.0)" and the score

Session "fixed_<n>" plays GOALS[n % len(GOALS)]; n >= num_goals answers HTTP 500, as the real
server does for a goal index it lacks. The score follows WebShop's formula in small:
(goal attributes found + chosen options that match + price within budget) / (attributes + options + 1),
halved when the product is of another category.

    with FakeWebShop() as shop:
        env = WebShopEnv(server_url=shop.url)
"""

from __future__ import annotations

import ast
import html
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    price: float
    category: str
    attributes: tuple[str, ...]
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""


def _shirt(n: int, title: str, price: float, attributes: tuple[str, ...]) -> Product:
    return Product(f"B0FAKE{n:04d}", title, price, "fashion", attributes,
                   {"color": ("black", "white", "navy"), "size": ("small", "medium", "large")},
                   f"A {title.lower()} for everyday wear.")


PRODUCTS: tuple[Product, ...] = (
    _shirt(1, "Men's Cotton Crew Neck T-Shirt", 15.99, ("cotton", "crew neck", "machine wash")),
    _shirt(2, "Women's Cotton V-Neck T-Shirt", 12.99, ("cotton", "v-neck")),
    _shirt(3, "Slim Fit Polo Shirt", 21.50, ("slim fit", "polyester")),
    _shirt(4, "Long Sleeve Henley Shirt", 24.00, ("long sleeve", "cotton")),
    _shirt(5, "Graphic Print T-Shirt", 11.00, ("graphic print",)),
    _shirt(6, "Moisture Wicking Athletic Shirt", 18.75, ("moisture wicking", "polyester")),
    _shirt(7, "Linen Button Down Shirt", 29.99, ("linen", "button down")),
    _shirt(8, "Flannel Plaid Shirt", 26.40, ("flannel", "long sleeve")),
    _shirt(9, "Oversized Pocket T-Shirt", 14.20, ("cotton", "pocket")),
    _shirt(10, "Kids Dinosaur T-Shirt", 9.99, ("kids", "cotton")),
    _shirt(11, "Vintage Band T-Shirt", 19.00, ("vintage", "cotton")),
    Product("B0FAKE0012", "Wireless Bluetooth Over-Ear Headphones", 39.99, "electronics",
            ("wireless", "noise cancelling"), {"color": ("black", "silver")}, "Forty hours of battery."),
    Product("B0FAKE0013", "Matte Liquid Lipstick Set", 12.50, "beauty", ("long lasting", "matte"),
            {"color": ("ruby red", "nude pink")}, "Six shades that last all day."),
    Product("B0FAKE0014", "Gluten Free Dark Chocolate Bar", 18.00, "food", ("gluten free", "dark chocolate"),
            {"size": ("pack of 6", "pack of 12")}, "70% cocoa."),
)
BY_ASIN = {p.asin: p for p in PRODUCTS}


@dataclass(frozen=True)
class Goal:
    instruction: str
    asin: str
    category: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float


GOALS: tuple[Goal, ...] = (
    Goal("i need a men's cotton crew neck t-shirt in navy, size large, and price lower than 30.00 dollars",
         "B0FAKE0001", "fashion", ("cotton", "crew neck"), {"color": "navy", "size": "large"}, 30.0),
    Goal("i want silver wireless bluetooth headphones with noise cancelling, and price lower than 50.00 dollars",
         "B0FAKE0012", "electronics", ("wireless", "noise cancelling"), {"color": "silver"}, 50.0),
    Goal("i am looking for a long lasting matte lipstick in ruby red, and price lower than 20.00 dollars",
         "B0FAKE0013", "beauty", ("long lasting", "matte"), {"color": "ruby red"}, 20.0),
    Goal("i would like a pack of 12 gluten free dark chocolate bars, and price lower than 40.00 dollars",
         "B0FAKE0014", "food", ("gluten free", "dark chocolate"), {"size": "pack of 12"}, 40.0),
)


def score(goal: Goal, product: Product, chosen: dict[str, str]) -> float:
    found = sum(a in product.attributes or a in product.title.lower() for a in goal.attributes)
    matched = sum(value in goal.options.values() for value in chosen.values())
    budget = product.price <= goal.price_upper
    total = (found + matched + budget) / (len(goal.attributes) + len(goal.options) + 1)
    return total if product.category == goal.category else total * 0.5


def search(keywords: list[str]) -> list[Product]:
    """Products sharing a word with the query, most shared words first (ties by asin)."""
    words = set(re.findall(r"[a-z0-9]+", " ".join(keywords).lower()))

    def overlap(p: Product) -> int:
        return len(words & set(re.findall(r"[a-z0-9]+", p.title.lower())))

    return sorted((p for p in PRODUCTS if overlap(p)), key=lambda p: (-overlap(p), p.asin))


# --------------------------------------------------------------------------------------------
# Pages, shaped like WebShop's templates (search_page, results_page, item_page, sub pages, done).
# --------------------------------------------------------------------------------------------


def url_for(*segments: object) -> str:
    """Flask's url_for for these routes: each path variable is str()-ed and percent-quoted."""
    return "/" + "/".join(urllib.parse.quote(str(s), safe="") for s in segments)


def _doc(body: str, script: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n    <title>WebShop</title>\n"
        "    <style>.grid-item { float: left; }</style>\n  </head>\n  <body>\n"
        f"    <!-- rendered by the fake WebShop server -->\n{body}\n  </body>\n{script}</html>\n"
    )


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _instruction(goal: Goal, query: str | None = None) -> str:
    lines = [f'      <div id="instruction-text">\n        <h4>Instruction:<br>{_e(goal.instruction)}</h4>']
    if query is not None:
        lines.append(f"        <h4>Current Query: {_e(query)}</h4>")
    return "\n".join(lines) + "\n      </div>"


def _button(action: str, text: str, css: str = "btn btn-primary") -> str:
    return f'      <form method="post" action="{_e(action)}">\n        <button type="submit" class="{css}">{_e(text)}</button>\n      </form>'


def search_page(sid: str, goal: Goal) -> str:
    return _doc(
        '    <div class="container">\n      <div id="logo"><h2>WebShop</h2></div>\n'
        f'      <div id="instruction-text" class="text-center">\n        <h4>Instruction: <br>{_e(goal.instruction)}</h4>\n      </div>\n'
        f'      <form role="form" id="form-buscar" method="post" action="{_e(url_for(sid))}">\n'
        '        <input id="search_input" class="form-control" type="text" name="search_query" placeholder="Search..." required/>\n'
        '        <button class="btn btn-success" type="submit"><i class="glyphicon glyphicon-search"></i>Search</button>\n'
        "      </form>\n    </div>"
    )


def results_page(sid: str, goal: Goal, keywords: list[str], page: int) -> str:
    hits = search(keywords)
    shown = hits[(page - 1) * 10: page * 10]
    parts = [_instruction(goal, " ".join(keywords)),
             f"      <h1>Results</h1>\n      <p>Page {page} ({(page - 1) * 10 + 1}-{page * 10}) of {len(hits)} total results</p>",
             _button(url_for(sid), "Back to Search", "btn btn-success")]
    if page > 1:
        parts.append(_button(url_for("search_results", sid, keywords, page - 1), "< Prev"))
    if page * 10 < len(hits):
        parts.append(_button(url_for("search_results", sid, keywords, page + 1), "Next >"))
    for p in shown:
        link = url_for("item_page", sid, p.asin, keywords, page, {})
        # WebShop's template closes these h4s with </h5>: the parser must survive stray end tags
        parts.append(
            f'      <div class="grid-item">\n        <h4 class="product-asin"><a class="product-link" href="{_e(link)}">{p.asin}</a></h4>\n'
            f'        <h4 class="product-title">{_e(p.title)}</h5>\n        <h5 class="product-price">${p.price:.2f}</h6>\n      </div>'
        )
    return _doc('    <div class="container">\n' + "\n".join(parts) + "\n    </div>")


def item_page(sid: str, goal: Goal, product: Product, keywords: str, page: str, chosen: dict[str, str]) -> str:
    parts = [_instruction(goal, keywords), _button(url_for(sid), "Back to Search", "btn btn-success"),
             _button(url_for("search_results", sid, keywords, page), "< Prev")]
    for name, values in product.options.items():
        radios = []
        for i, value in enumerate(values):
            url = url_for("item_page", sid, product.asin, keywords, page, {**chosen, name: value})
            radios.append(f'          <input type="radio" id="radio_{_e(name)}{i}" name="{_e(name)}" value="{_e(value)}" '
                          f'data-url="{_e(url)}">\n          <label for="radio_{_e(name)}{i}">{_e(value)}</label>')
        parts.append(f'      <div class="row">\n        <h4>{_e(name)}</h4>\n        <div class="radio-toolbar">\n'
                     + "\n".join(radios) + "\n        </div>\n      </div>")
    parts.append(f"      <h2>{_e(product.title)}</h2>\n      <h4>Price: ${product.price:.2f}</h4>\n      <h4>Rating: N.A.</h4>")
    for sub in ("Description", "Features", "Reviews"):
        parts.append(_button(url_for("item_sub_page", sid, product.asin, keywords, page, sub, chosen), sub))
    parts.append(_button(url_for("done", sid, product.asin, chosen), "Buy Now", "btn btn-lg purchase"))
    script = "  <script>\n    $(document).ready(function() { console.log('options'); });\n  </script>\n"
    return _doc('    <div class="container">\n' + "\n".join(parts) + "\n    </div>", script)


def sub_page(sid: str, goal: Goal, product: Product, keywords: str, page: str, sub: str, chosen: dict[str, str]) -> str:
    text = {"Description": product.description, "Features": ", ".join(product.attributes),
            "Reviews": "No reviews yet."}.get(sub, "")
    parts = [_instruction(goal, keywords), _button(url_for(sid), "Back to Search", "btn btn-success"),
             _button(url_for("item_page", sid, product.asin, keywords, page, chosen), "< Prev"),
             f'      <p class="product-info">{_e(text)}</p>']
    return _doc('    <div class="container">\n' + "\n".join(parts) + "\n    </div>")


def done_page(goal: Goal, product: Product, chosen: dict[str, str], value: float) -> str:
    return _doc(
        '    <div id="thankyou"><h1>Thank you for shopping with us!</h1></div>\n'
        '    <div id="stats">\n'
        f'      <div style="display:none">\n        <h4 id="goal-asin">asin<pre>{goal.asin}</pre></h4>\n'
        f"        <h4>options<pre>{_e(chosen)}</pre></h4>\n      </div>\n"
        f'      <h3 id="reward">Your score (min 0.0, max 1.0)<pre>{value}</pre></h3>\n'
        f"      <h4 hidden>Reward Details <pre>{_e(product.asin)}</pre></h4>\n    </div>"
    )


# --------------------------------------------------------------------------------------------
# The server.
# --------------------------------------------------------------------------------------------


class FakeWebShop:
    """The fake server in a daemon thread on 127.0.0.1 (a free port). `delay` slows every answer;
    `requests` records (method, path) of every request."""

    def __init__(self, num_goals: int = 12087, port: int = 0) -> None:
        self.num_goals = num_goals
        self.delay = 0.0
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        shop = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                shop._answer(self, "GET", {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                shop._answer(self, "POST", {k: v[0] for k, v in form.items()})

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, method: str, form: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, handler.path))
        if self.delay:
            time.sleep(self.delay)
        try:
            status, location, body = self._route(method, handler.path, form)
        except (KeyError, ValueError, IndexError, SyntaxError) as err:  # a Flask app would answer 500 too
            status, location, body = 500, None, f"<h1>Internal Server Error</h1><p>{_e(err)}</p>"
        payload = body.encode()
        try:
            handler.send_response(status)
            if location:
                handler.send_header("Location", location)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def _goal(self, sid: str) -> Goal:
        if not sid.startswith("fixed_"):
            raise KeyError(f"unknown session {sid}")
        index = int(sid.split("_")[-1])
        if index >= self.num_goals:
            raise IndexError("list index out of range")
        return GOALS[index % len(GOALS)]

    def _route(self, method: str, path: str, form: dict[str, str]) -> tuple[int, str | None, str]:
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(path).path.strip("/").split("/")]
        route, args = parts[0], parts[1:]
        if len(parts) == 1:
            goal = self._goal(route)
            if method == "POST" and "search_query" in form:
                keywords = form["search_query"].lower().split(" ")
                return 302, url_for("search_results", route, keywords, 1), ""
            return 200, None, search_page(route, goal)
        if route == "search_results":
            sid, keywords, page = args
            return 200, None, results_page(sid, self._goal(sid), _keywords(keywords), int(page))
        if route == "item_page":
            sid, asin, keywords, page, options = args
            return 200, None, item_page(sid, self._goal(sid), BY_ASIN[asin], keywords, page, ast.literal_eval(options))
        if route == "item_sub_page":
            sid, asin, keywords, page, sub, options = args
            return 200, None, sub_page(sid, self._goal(sid), BY_ASIN[asin], keywords, page, sub,
                                       ast.literal_eval(options))
        if route == "done":
            sid, asin, options = args
            goal, product, chosen = self._goal(sid), BY_ASIN[asin], ast.literal_eval(options)
            return 200, None, done_page(goal, product, chosen, score(goal, product, chosen))
        return 404, None, "<h1>Not Found</h1>"


def _keywords(text: str) -> list[str]:
    return ast.literal_eval(text) if text.startswith("[") else [text]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Serve the fake WebShop until Ctrl-C.")
    parser.add_argument("--port", type=int, default=3000)
    with FakeWebShop(port=parser.parse_args().port) as running:
        print(f"fake WebShop at {running.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
