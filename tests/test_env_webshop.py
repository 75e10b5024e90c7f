"""Tests of WebShopEnv against a fake WebShop server (tests/webshop_fake.py) over real HTTP.

The fake serves the real server's routes with pages shaped like its templates, so these tests go
through the client's HTTP, redirect, HTML-parsing and scoring code. The real server cannot run here.
"""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from webshop_fake import GOALS, FakeWebShop

from sdar_cli.envs import (
    BUILTIN_ENVIRONMENTS,
    EnvironmentConfigError,
    environment_factory,
)
from sdar_cli.envs.webshop import (
    FULL_DATA_GOALS,
    SEARCH_ACTION,
    TASK_TYPES,
    WIN_REWARD,
    WebShopEnv,
    WebShopServerError,
    _fetch,
    _Page,
    task_type_of,
)

FAST = {"timeout": 5.0, "retries": 1, "backoff": 0.05}
CORRECT_EPISODE = ["search[cotton crew neck t-shirt]", "click[b0fake0001]", "click[navy]", "click[large]",
                   "click[buy now]"]


@pytest.fixture(scope="module")
def shop():
    with FakeWebShop() as server:
        yield server


@pytest.fixture()
def env(shop):
    environment = WebShopEnv(server_url=shop.url, **FAST)
    yield environment
    environment.close()


def play(env: WebShopEnv, actions: list[str]):
    observations = [env.step(action) for action in actions]
    return observations[-1], observations


# -- episodes --------------------------------------------------------------------------------


def test_scripted_correct_episode_scores_one_and_wins(env):
    task, first = env.reset("fixed_0")
    assert task.description == GOALS[0].instruction
    assert task.task_type == "fashion"
    assert (first.text, first.admissible_actions, first.privileged) == ("Search", [SEARCH_ACTION], "")
    last, steps = play(env, CORRECT_EPISODE)
    assert [o.done for o in steps] == [False, False, False, False, True]
    assert [o.reward for o in steps] == [0.0, 0.0, 0.0, 0.0, WIN_REWARD]
    assert last.won and env.score == 1.0
    assert last.text == "Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] 1.0"
    assert last.admissible_actions == []
    # the hidden goal details of the done page never reach the text
    assert "B0FAKE0001" not in last.text


@pytest.mark.parametrize(
    ("actions", "expected_score"),
    [
        # another t-shirt, right options: crew neck missing -> (1 attr + 2 options + price) / 5
        (["search[cotton t-shirt]", "click[b0fake0002]", "click[navy]", "click[large]", "click[buy now]"], 0.8),
        # the right t-shirt without choosing options -> (2 attrs + 0 + price) / 5
        (["search[cotton t-shirt]", "click[b0fake0001]", "click[buy now]"], 0.6),
        # a lipstick for a t-shirt goal: other category, halved -> (0 + 0 + price) / 5 / 2
        (["search[lipstick]", "click[b0fake0013]", "click[buy now]"], 0.1),
        # headphones over the budget: -> (0 + 0 + 0) / 5 / 2
        (["search[headphones]", "click[b0fake0012]", "click[buy now]"], 0.0),
    ],
)
def test_wrong_purchase_gets_partial_score_and_no_win(env, actions, expected_score):
    env.reset("fixed_0")
    last, _ = play(env, actions)
    assert last.done and not last.won
    assert env.score == pytest.approx(expected_score)
    assert last.reward == 0.0


def test_score_reward_mode_pays_ten_times_the_score(shop):
    env = WebShopEnv(server_url=shop.url, reward_mode="score", **FAST)
    env.reset("fixed_0")
    last, _ = play(env, ["search[cotton t-shirt]", "click[b0fake0002]", "click[navy]", "click[large]", "click[buy now]"])
    assert (last.reward, last.won) == (pytest.approx(8.0), False)
    env.reset("fixed_4")  # goal 4 % 4 = the t-shirt goal again
    assert play(env, CORRECT_EPISODE)[0].reward == pytest.approx(10.0)


def test_other_goals_are_reachable_and_typed(env):
    expected = {1: ("electronics", ["search[bluetooth headphones]", "click[b0fake0012]", "click[silver]"]),
                2: ("beauty", ["search[matte lipstick]", "click[b0fake0013]", "click[ruby red]"]),
                3: ("food", ["search[dark chocolate]", "click[b0fake0014]", "click[pack of 12]"])}
    for index, (task_type, actions) in expected.items():
        task, _ = env.reset(f"fixed_{index}")
        assert task.task_type == task_type
        last, _ = play(env, actions + ["click[Buy Now]"])  # clicks are case-insensitive, as in WebShop
        assert (last.won, env.score) == (True, 1.0)


def test_observation_and_admissible_actions_of_a_results_page(env):
    env.reset("fixed_0")
    obs = env.step("search[Cotton T-Shirt]")
    products = [("B0FAKE0001", "Men's Cotton Crew Neck T-Shirt", "$15.99"),
                ("B0FAKE0002", "Women's Cotton V-Neck T-Shirt", "$12.99"),
                ("B0FAKE0005", "Graphic Print T-Shirt", "$11.00"),
                ("B0FAKE0009", "Oversized Pocket T-Shirt", "$14.20"),
                ("B0FAKE0010", "Kids Dinosaur T-Shirt", "$9.99"),
                ("B0FAKE0011", "Vintage Band T-Shirt", "$19.00"),
                ("B0FAKE0003", "Slim Fit Polo Shirt", "$21.50"),
                ("B0FAKE0004", "Long Sleeve Henley Shirt", "$24.00"),
                ("B0FAKE0006", "Moisture Wicking Athletic Shirt", "$18.75"),
                ("B0FAKE0007", "Linen Button Down Shirt", "$29.99")]
    expected_text = " [SEP] ".join(
        ["Current Query: cotton t-shirt", "Results", "Page 1 (1-10) of 11 total results", "Back to Search", "Next >"]
        + [field for product in products for field in product]
    )
    assert obs.text == expected_text
    assert obs.admissible_actions == ["click[back to search]", "click[next >]"] + [
        f"click[{asin.lower()}]" for asin, _, _ in products
    ]


def test_item_page_lists_buttons_then_options(env):
    env.reset("fixed_0")
    obs = env.step("search[cotton t-shirt]")
    obs = env.step("click[b0fake0001]")
    assert obs.text == (
        "Current Query: ['cotton', 't-shirt'] [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] black [SEP] white "
        "[SEP] navy [SEP] size [SEP] small [SEP] medium [SEP] large [SEP] Men's Cotton Crew Neck T-Shirt [SEP] "
        "Price: $15.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now"
    )
    assert obs.admissible_actions == [
        "click[back to search]", "click[< prev]", "click[description]", "click[features]", "click[reviews]",
        "click[buy now]", "click[black]", "click[white]", "click[navy]", "click[small]", "click[medium]",
        "click[large]",
    ]
    sub = env.step("click[description]")
    assert sub.text.endswith("[SEP] A men's cotton crew neck t-shirt for everyday wear.")
    assert env.step("click[< prev]").text == obs.text


def test_paging_next_and_prev(env):
    env.reset("fixed_0")
    first = env.step("search[shirt]")
    second = env.step("click[next >]")
    assert second.text == ("Current Query: shirt [SEP] Results [SEP] Page 2 (11-20) of 11 total results [SEP] "
                           "Back to Search [SEP] < Prev [SEP] B0FAKE0011 [SEP] Vintage Band T-Shirt [SEP] $19.00")
    assert second.admissible_actions == ["click[back to search]", "click[< prev]", "click[b0fake0011]"]
    back = env.step("click[< prev]")
    assert (back.text, back.admissible_actions) == (first.text, first.admissible_actions)
    assert "click[< prev]" not in first.admissible_actions
    searched = env.step("click[back to search]")
    assert (searched.text, searched.admissible_actions) == ("Search", [SEARCH_ACTION])


def test_inadmissible_actions_change_nothing_and_send_nothing(shop, env):
    env.reset("fixed_0")
    results = env.step("search[shirt]")
    sent = len(shop.requests)
    for action in ["click[b0fake0099]", "search[socks]", "buy it now", "click[]", "click[search]"]:
        obs = env.step(action)
        assert (obs.text, obs.admissible_actions, obs.reward, obs.done) == (results.text, results.admissible_actions,
                                                                            0.0, False)
    assert len(shop.requests) == sent
    env.step("click[back to search]")
    assert env.step(SEARCH_ACTION).text == "Search"  # the placeholder itself is not a query


def test_step_after_the_purchase_stays_done(env):
    env.reset("fixed_0")
    play(env, CORRECT_EPISODE)
    again = env.step("click[back to search]")
    assert (again.done, again.reward, again.admissible_actions) == (True, 0.0, [])


def test_parallel_episodes_on_one_task_do_not_interfere(shop):
    envs = [WebShopEnv(server_url=shop.url, **FAST) for _ in range(4)]
    scores: dict[int, float | None] = {}

    def run(slot: int) -> None:
        envs[slot].reset("fixed_0")
        actions = CORRECT_EPISODE if slot % 2 == 0 else ["search[shirt]", "click[b0fake0002]", "click[buy now]"]
        play(envs[slot], actions)
        scores[slot] = envs[slot].score

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # the V-neck with no options: (cotton + price) / 5
    assert scores == {0: 1.0, 1: pytest.approx(0.4), 2: 1.0, 3: pytest.approx(0.4)}


# -- parsing a page shaped like WebShop's original templates ---------------------------------------

ORIGINAL_RESULTS_PAGE = """<!DOCTYPE html>
<html>
  <head>
    <link rel="stylesheet" href="/static/style.css">
    <script src="https://example.invalid/jquery.min.js"></script>
  </head>
  <body>
    <div class="container py-5">
      <div id="instruction-text">
        <h4 style="padding:2px 10px;">Instruction: i want a pair of &quot;trail&quot; running shoes, and price lower than 60.00 dollars</h4>
        <h4 style="padding:2px 10px;">Current Query:  trail  running shoes </h4>
      </div>
      <div class="row top-buffer"><div class="col-sm-8"><div>
            <h1>Results</h1>
            <p>Page 2 (11-20) of 50 total results</p>
          </div>
          <div class="inline-block">
            <form method="post" action="/fixed_7" style="float:left;padding-right:10px;">
              <button type="submit" class="btn btn-success">Back to Search</button>
            </form>
            <form method="post" action="/search_results/fixed_7/%5B%27trail%27%2C%20%27running%27%5D/1">
              <button type="submit" class="btn btn-primary">&lt; Prev</button>
            </form>
            <form method="post" action="/search_results/fixed_7/%5B%27trail%27%2C%20%27running%27%5D/3">
              <button type="submit" class="btn btn-primary">Next &gt;</button>
            </form>
      </div></div></div>
      <!-- <div class="row top-buffer"> old layout <a class="product-link" href="/x">B000000000</a> </div> -->
      <div class="grid-container">
        <div class="grid-item">
          <img src="https://example.invalid/1.jpg" class="result-img">
          <h4 class="mt-0 font-weight-bold mb-2 product-asin"><a class="product-link" href="/item_page/fixed_7/B07ABCDE12/%5B%27trail%27%5D/2/%7B%7D">B07ABCDE12</a></h4>
          <h4 class="mt-0 font-weight-bold mb-2 product-title">Trail Runner 2 &amp; Co. Shoe</h5>
          <div class="d-flex align-items-center justify-content-between mt-1">
            <h5 class="font-weight-bold my-2 product-price">$45.0 to $59.99</h6>
          </div>
        </div>
      </div>
    </div>
  </body>
</html>"""


def test_page_parsing_of_an_original_template_results_page():
    page = _Page("http://shop.example:3000/search_results/fixed_7/x/2", ORIGINAL_RESULTS_PAGE)
    assert page.instruction == 'i want a pair of "trail" running shoes, and price lower than 60.00 dollars'
    # the instruction's own node ("Instruction: ...") and everything before it are dropped
    assert page.text() == ("Current Query: trail running shoes [SEP] Results [SEP] Page 2 (11-20) of 50 total results "
                           "[SEP] Back to Search [SEP] < Prev [SEP] Next > [SEP] B07ABCDE12 [SEP] "
                           "Trail Runner 2 & Co. Shoe [SEP] $45.0 to $59.99")
    assert page.admissible_actions() == ["click[back to search]", "click[< prev]", "click[next >]", "click[b07abcde12]"]
    assert page.clickables["next >"].method == "post"
    assert page.clickables["next >"].url == (
        "http://shop.example:3000/search_results/fixed_7/%5B%27trail%27%2C%20%27running%27%5D/3")
    assert page.clickables["b07abcde12"].method == "get"
    assert (page.is_done, page.score, page.search_url) == (False, None, None)


# -- the server: down, slow, not WebShop, fewer goals -----------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_down_is_a_config_error_that_says_how_to_start_it():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EnvironmentConfigError) as caught:
        WebShopEnv(server_url=url)
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert url in message and "./run_dev.sh" in message and "python -m web_agent_site.app" in message
    assert "port 3000" in message and "setup.sh" in message


def test_slow_server_times_out_within_the_timeout_then_retries_and_raises():
    with FakeWebShop() as slow:
        env = WebShopEnv(server_url=slow.url, timeout=0.3, retries=1, backoff=0.05)
        env.reset("fixed_0")
        slow.delay = 2.0
        started = time.monotonic()
        with pytest.raises(WebShopServerError, match="2 attempt"):
            env.step("search[shirt]")
        elapsed = time.monotonic() - started
        slow.delay = 0.0
    assert elapsed < 1.5  # 2 x 0.3 s + 0.05 s backoff, far below the server's 2 s
    assert [m for m, _ in slow.requests].count("POST") == 2  # the first try and one retry


def test_a_server_that_trickles_its_answer_is_cut_at_the_timeout():
    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            try:
                for _ in range(100):  # one byte every 0.1 s: each socket read is quick, the whole is 10 s
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(WebShopServerError, match="1 attempt"):
            _fetch("get", f"http://127.0.0.1:{server.server_address[1]}/fixed_0", None, 0.5, 0, 0.0)
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()
        server.server_close()


def test_server_that_does_not_answer_at_startup_is_a_config_error():
    with FakeWebShop() as stuck:
        stuck.delay = 2.0
        started = time.monotonic()
        with pytest.raises(EnvironmentConfigError, match="startup_timeout"):
            WebShopEnv(server_url=stuck.url, startup_timeout=0.3)
        assert time.monotonic() - started < 1.5
        stuck.delay = 0.0


def test_a_server_that_is_not_webshop_is_a_config_error():
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html><body><h1>Hello</h1></body></html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EnvironmentConfigError, match="not with WebShop's search page"):
            WebShopEnv(server_url=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_with_fewer_goals_names_the_count_to_set():
    with FakeWebShop(num_goals=1234) as small:
        with pytest.raises(EnvironmentConfigError, match="serves 1234 goals.*num_goals: 1234"):
            WebShopEnv(server_url=small.url, **FAST)
        env = WebShopEnv(server_url=small.url, num_goals=1234, **FAST)
    assert [len(env.task_ids(s)) for s in ("test", "eval", "train")] == [500, 734, 0]


# -- task ids and configuration ------------------------------------------------------------


def test_task_ids_follow_webshop_split_ranges(env):
    assert FULL_DATA_GOALS == 12087
    test, evaluation, train = env.task_ids("test"), env.task_ids("eval"), env.task_ids("train")
    assert (test[0], test[-1], len(test)) == ("fixed_0", "fixed_499", 500)
    assert (evaluation[0], evaluation[-1], len(evaluation)) == ("fixed_500", "fixed_1499", 1000)
    assert (train[0], train[-1], len(train)) == ("fixed_1500", "fixed_12086", 10587)
    with pytest.raises(ValueError, match="unknown split"):
        env.task_ids("valid")
    for bad in ["fixed_12087", "fixed_-1", "3", "abc_3"]:
        with pytest.raises(ValueError, match="unknown task id"):
            env.reset(bad)


def test_custom_split_ranges(shop):
    env = WebShopEnv(server_url=shop.url, split_ranges={"train": [10, 14], "test": [0, 2]}, **FAST)
    assert env.task_ids("train") == ["fixed_10", "fixed_11", "fixed_12", "fixed_13"]
    assert env.task_ids("test") == ["fixed_0", "fixed_1"]
    for bad in [{"train": [5, 5]}, {"train": [0, 20000]}, {"train": [3]}, {}]:
        with pytest.raises(ValueError, match="split_ranges"):
            WebShopEnv(server_url=shop.url, split_ranges=bad)


@pytest.mark.parametrize("kwargs", [{"server_url": "localhost:3000"}, {"timeout": 0}, {"retries": -1},
                                    {"reward_mode": "dense"}, {"num_goals": 0}])
def test_bad_kwargs_are_rejected(kwargs):
    with pytest.raises(ValueError):
        WebShopEnv(**kwargs)


def test_environment_factory_builds_independent_environments(shop):
    assert BUILTIN_ENVIRONMENTS["webshop"] == "sdar_cli.envs.webshop:WebShopEnv"
    make = environment_factory("webshop", {"server_url": shop.url, **FAST})
    first, second = make(), make()
    assert isinstance(first, WebShopEnv) and first is not second
    first.reset("fixed_0")
    second.reset("fixed_1")
    first.step("search[shirt]")
    assert second.step("search[headphones]").admissible_actions[-1] == "click[b0fake0012]"
    assert first.max_turns == 15 and first.skill_bank == "webshop"
    with pytest.raises(EnvironmentConfigError, match="kwargs"):
        environment_factory("webshop", {"server_url": shop.url, "port": 3000})
    with pytest.raises(EnvironmentConfigError, match="No WebShop server"):
        environment_factory("webshop", {"server_url": f"http://127.0.0.1:{free_port()}"})


def test_rollout_defaults_fit_the_rollout_settings():
    from sdar_cli.config import RolloutSettings

    settings = RolloutSettings(**WebShopEnv.rollout_defaults)
    assert settings.history_turns == 2 and settings.max_new_tokens == 512
    assert "{observation}" in settings.prompt_template and "{actions}" in settings.prompt_template


# -- task types and skills -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instruction", "task_type"),
    [
        ("i need a long clip-in hair extension which is natural looking, and price lower than 40.00 dollars", "beauty"),
        ("i am looking for a x-large short sleeve t-shirt in heather grey", "fashion"),
        ("womens running shoes with rubber sole size 8", "fashion"),
        ("i need a high speed hdmi cable that is 6 feet long", "electronics"),
        ("i want a mid century modern accent chair for my living room", "home"),
        ("gluten free protein bars with peanut butter flavor, pack of 12", "food"),
        ("i need a stainless steel dog bowl", "other"),
    ],
)
def test_task_type_from_instruction_keywords(instruction, task_type):
    assert task_type_of(instruction) == task_type


def test_every_task_type_has_skills():
    from sdar_cli.skills import SkillBank, resolve_bank_dir

    bank = SkillBank.load("webshop")
    folder = resolve_bank_dir("webshop")
    for task_type in TASK_TYPES:
        stems = bank.files_for(task_type)
        assert stems[0] == "general" and len(stems) == 2
        assert all(bank.skills_by_file.get(stem) for stem in stems), task_type
    for path in folder.glob("*.md"):
        assert 1000 <= path.stat().st_size <= 4096, path.name


def test_example_config_loads_with_the_environment_settings():
    from sdar_cli.config import load_config

    config = load_config(Path(__file__).parent.parent / "examples" / "webshop.yaml")
    assert (config.env.name, config.env.eval_split, config.teacher.skills.bank) == ("webshop", "test", "webshop")
    for key in ("action_pattern", "stop_strings", "prompt_template"):
        assert getattr(config.rollout, key) == WebShopEnv.rollout_defaults[key], key


def test_the_rollout_sends_searches_and_a_scripted_agent_buys_the_right_product(shop):
    """Through play_episodes, as in training: a search must count as valid and reach the server."""
    from conftest import build_tiny_tokenizer

    from sdar_cli.config import load_config
    from sdar_cli.rollout import TurnRenderer, play_episodes

    tokenizer = build_tiny_tokenizer()
    config = load_config(None, ["env.name=webshop", f"env.kwargs.server_url={shop.url}"])
    renderer = TurnRenderer(tokenizer, config.rollout, config.teacher)
    turn = {"n": 0}

    def scripted(prompts):
        action = CORRECT_EPISODE[turn["n"]]
        turn["n"] += 1
        ids = tokenizer(f"<action>{action}</action>", add_special_tokens=False)["input_ids"]
        return [ids + [tokenizer.eos_token_id] for _ in prompts]

    make_env = environment_factory("webshop", {"server_url": shop.url, **FAST})
    samples, episodes = play_episodes(["fixed_0", "fixed_0"], [0, 0], make_env, scripted, renderer, 15, env_workers=2)
    assert [(e.won, e.outcome_reward, e.turns, e.invalid_actions) for e in episodes] == [(True, WIN_REWARD, 5, 0)] * 2
    assert [s.action for s in samples[:2]] == [CORRECT_EPISODE[0]] * 2 and all(s.valid for s in samples)
