"""Tests of the Search-QA environment: answer scoring, episodes, retrievers, data files, synthetic data."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sdar_cli.envs import environment_factory
from sdar_cli.envs.base import EnvironmentConfigError
from sdar_cli.envs.retrieval import (
    BM25Retriever,
    HTTPRetriever,
    Passage,
    RetrievalError,
    bm25_retriever,
    format_passages,
    read_corpus,
)
from sdar_cli.envs.searchqa import (
    PROMPT_TEMPLATE,
    SearchQAEnv,
    exact_match,
    normalize_answer,
    read_questions,
    token_f1,
)
from sdar_cli.envs.searchqa_synth import generate, synthetic_dataset
from sdar_cli.prompts import check_template, parse_action

SKILLS = Path(__file__).resolve().parents[1] / "src" / "sdar_cli" / "skills" / "search"

CORPUS = [
    {"id": "0", "contents": '"Lisbon"\nLisbon is the capital and largest city of Portugal.'},
    {"id": "1", "contents": '"Porto"\nPorto is a coastal city in northern Portugal, known for port wine.'},
    {"id": "2", "title": "Marie Curie", "text": "Marie Curie was a physicist and chemist born in Warsaw."},
    {"id": "3", "title": "Warsaw", "text": "Warsaw is the capital of Poland, on the Vistula river."},
]
QUESTIONS = [
    {"id": "q0", "question": "What is the capital of Portugal?", "golden_answers": ["Lisbon"], "data_source": "nq"},
    {"id": "q1", "question": "In which city was Marie Curie born?", "golden_answers": ["Warsaw", "Warszawa"],
     "data_source": "hotpotqa"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("searchqa-data")
    write_jsonl(folder / "corpus.jsonl", CORPUS)
    write_jsonl(folder / "train.jsonl", QUESTIONS)
    write_jsonl(folder / "test.jsonl", QUESTIONS[:1])
    return folder


@pytest.fixture(scope="module")
def synth_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("searchqa-cache")


@pytest.fixture(scope="module")
def synth_env(synth_cache) -> SearchQAEnv:
    return SearchQAEnv(dataset="synthetic", cache_dir=str(synth_cache), num_train_tasks=120, num_test_tasks=40)


def files_env(folder: Path, **kwargs) -> SearchQAEnv:
    return SearchQAEnv(data_dir=str(folder), corpus=str(folder / "corpus.jsonl"), cache_dir=str(folder / "cache"),
                       **kwargs)


# -- answer scoring ----------------------------------------------------------------------------


def test_normalisation_and_exact_match_follow_squad():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("A  tale of  an apple") == "tale of apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert exact_match("an Apple.", ["apple"]) == 1.0
    assert exact_match("Warszawa", ["Warsaw", "Warszawa"]) == 1.0
    assert exact_match("Warsaw city", ["Warsaw"]) == 0.0


def test_token_f1_by_hand():
    # pred {big, red, apple}, gold {red, apple, pie}: 2 shared, P = R = 2/3, F1 = 2/3
    assert token_f1("the big red apple", ["red apple pie"]) == pytest.approx(2 / 3)
    # best over golden answers: vs "Paris" P = 1/2, R = 1, F1 = 2/3; vs "London" 0
    assert token_f1("Paris, France", ["London", "Paris"]) == pytest.approx(2 / 3)
    # shared tokens count by multiplicity: [new, new, york] vs [new, york] share 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("new new york", ["New York"]) == pytest.approx(0.8)
    assert token_f1("Berlin", ["Paris"]) == 0.0
    assert token_f1("", ["Paris"]) == 0.0


# -- episodes on user data -----------------------------------------------------------------------


def test_files_episode_search_then_answer(tiny_data):
    env = files_env(tiny_data)
    assert env.task_ids("train") == ["train-00000", "train-00001"]
    task, obs = env.reset("train-00001")
    assert task.task_type == "hotpotqa" and task.description == "Question: In which city was Marie Curie born?"
    assert obs.admissible_actions == [] and not obs.done and obs.privileged == ""
    obs = env.step("<search>Marie Curie born</search>")
    assert obs.text.startswith("<information>Doc 1(Title: Marie Curie) Marie Curie was a physicist")
    assert obs.reward == 0.0 and not obs.done
    obs = env.step("<answer> warszawa </answer>")
    assert (obs.reward, obs.done, obs.won) == (1.0, True, True)
    assert env.last_metrics == {"exact_match": 1.0, "f1": 1.0, "answered": 1.0, "searches": 1.0, "turns": 2.0}
    assert obs.metrics == env.last_metrics  # the final observation carries them, for sdar eval to average


def test_wrong_answer_scores_zero_with_f1(tiny_data):
    env = files_env(tiny_data)
    env.reset("train-00000")
    obs = env.step("<answer>Lisbon Portugal</answer>")
    assert (obs.reward, obs.done, obs.won) == (0.0, True, False)
    assert env.last_metrics["exact_match"] == 0.0 and env.last_metrics["f1"] == pytest.approx(2 / 3)
    assert "wrong" in obs.text and "F1 0.67" in obs.text


def test_turn_limit_without_answer_ends_with_zero(tiny_data):
    env = files_env(tiny_data)
    assert env.max_turns == 4
    env.reset("train-00000")
    rewards = []
    for turn in range(1, 5):
        obs = env.step("<search>Portugal capital</search>")
        rewards.append(obs.reward)
        assert obs.done == (turn == 4)
        if turn == 3:
            assert "last turn" in obs.text
    assert rewards == [0.0] * 4 and not obs.won
    assert "Out of turns" in obs.text and env.last_metrics["answered"] == 0.0
    assert obs.metrics["answered"] == 0.0 and obs.metrics["f1"] == 0.0
    with pytest.raises(RuntimeError):
        env.step("<answer>Lisbon</answer>")


def test_untagged_reply_gets_the_format_and_uses_a_turn(tiny_data):
    env = files_env(tiny_data)
    env.reset("train-00000")
    obs = env.step("I think it is Lisbon")
    assert (obs.reward, obs.done) == (0.0, False)
    assert "<search>" in obs.text and "<answer>" in obs.text and "Turns left: 3" in obs.text
    obs = env.step("<search>   </search>")
    assert not obs.done and "no query" in obs.text
    assert env.step("<answer>Lisbon</answer>").reward == 1.0


def test_privileged_answer_option(tiny_data):
    env = files_env(tiny_data, privileged_answer=True)
    _, obs = env.reset("train-00001")
    assert obs.privileged == "The correct answer is: Warsaw."


def test_rollout_defaults_parse_the_whole_tag():
    defaults = SearchQAEnv.rollout_defaults
    pattern = re.compile(defaults["action_pattern"], re.DOTALL)
    reply = "<think>I need the city.</think>\n<search>Marie\n Curie birthplace</search>"
    assert parse_action(reply, pattern) == "<search>Marie Curie birthplace</search>"
    assert parse_action("<think>ok</think><answer>Warsaw</answer>", pattern) == "<answer>Warsaw</answer>"
    assert parse_action("Warsaw", pattern) is None
    assert defaults["stop_strings"] == ["</search>", "</answer>"]
    assert defaults["invalid_action_penalty"] == 0.01 and defaults["history_turns"] == 4
    check_template(PROMPT_TEMPLATE)
    assert SearchQAEnv.skill_bank == "search"


# -- retrievers ------------------------------------------------------------------------------


def test_bm25_reads_both_corpus_layouts_and_ranks_the_right_doc_first(tiny_data):
    passages = read_corpus(tiny_data / "corpus.jsonl")
    assert passages[0] == Passage("Lisbon", "Lisbon is the capital and largest city of Portugal.")
    assert passages[2].title == "Marie Curie"
    retriever = BM25Retriever(passages)
    assert retriever.search("capital of Poland", 2)[0].title == "Warsaw"
    assert retriever.search("port wine", 3)[0].title == "Porto"
    assert retriever.search("zebra quantum", 3) == []  # no shared term: no hit
    text = format_passages(retriever.search("Marie Curie", 1))
    assert text == "Doc 1(Title: Marie Curie) Marie Curie was a physicist and chemist born in Warsaw."


def test_bm25_index_is_shared_saved_and_reloaded(tiny_data, tmp_path, monkeypatch):
    from sdar_cli.envs import retrieval

    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    first = bm25_retriever(corpus, tmp_path / "cache")
    assert bm25_retriever(corpus, tmp_path / "cache") is first
    saved = list((tmp_path / "cache" / "bm25").iterdir())
    assert len(saved) == 1 and (saved[0] / "params.index.json").is_file()
    # a new process (an empty in-memory cache) loads the saved index instead of indexing again
    monkeypatch.setattr(retrieval, "_bm25_cache", {})
    built = []
    monkeypatch.setattr(retrieval.BM25Retriever, "__init__", _recording_init(retrieval.BM25Retriever.__init__, built))
    reloaded = bm25_retriever(corpus, tmp_path / "cache")
    assert built == [True] and reloaded is not first
    assert reloaded.search("capital of Poland", 1)[0].title == "Warsaw"
    env_a, env_b = files_env(tiny_data), files_env(tiny_data)
    assert env_a.retriever is env_b.retriever


def _recording_init(init, calls):
    def wrapped(self, passages, index=None):
        calls.append(index is not None)
        init(self, passages, index)

    return wrapped


class _Server:
    """A tiny Search-R1 style retrieval server in a thread; `behaviour(n)` decides answer n."""

    def __init__(self, behaviour):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, **body})
                status, delay = behaviour(len(outer.requests))
                time.sleep(delay)
                hits = [[{"document": {"id": "7", "contents": f'"Doc for {q}"\nText about {q}.'}, "score": 0.9}
                         for _ in range(body["topk"])] for q in body["queries"]]
                payload = json.dumps({"result": hits}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(behaviour=lambda n: (200, 0.0)):
        servers.append(_Server(behaviour))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_http_client_speaks_search_r1(server_factory):
    server = server_factory()
    retriever = HTTPRetriever(server.url + "/retrieve", timeout=5)
    passages = retriever.search("Marie Curie", 2)
    assert passages == [Passage("Doc for Marie Curie", "Text about Marie Curie.", 0.9)] * 2
    health, query = server.requests
    assert health["path"] == "/retrieve" and health["topk"] == 1
    assert query == {"path": "/retrieve", "queries": ["Marie Curie"], "topk": 2, "return_scores": True}


def test_http_server_down_fails_at_construction(tiny_data):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    started = time.perf_counter()
    with pytest.raises(EnvironmentConfigError) as err:
        SearchQAEnv(data_dir=str(tiny_data), retrieval_url=f"http://127.0.0.1:{port}", retrieval_timeout=2)
    assert time.perf_counter() - started < 2
    message = str(err.value)
    assert f"http://127.0.0.1:{port}/retrieve did not answer within 2 s" in message
    assert "retrieval_server.py" in message


def test_http_slow_server_times_out(server_factory):
    server = server_factory(lambda n: (200, 1.5))
    retriever = HTTPRetriever(server.url, timeout=0.3, retries=0, check=False)
    started = time.perf_counter()
    with pytest.raises(RetrievalError, match="timed out"):
        retriever.search("anything", 1)
    assert time.perf_counter() - started < 1.2


def test_http_retry_after_one_failure(server_factory):
    server = server_factory(lambda n: (500 if n == 1 else 200, 0.0))
    retriever = HTTPRetriever(server.url, timeout=2, retries=2, backoff=0.01, check=False)
    assert retriever.search("Warsaw", 1)[0].title == "Doc for Warsaw"
    assert len(server.requests) == 2
    always_failing = server_factory(lambda n: (503, 0.0))
    with pytest.raises(RetrievalError, match="failed 2 time"):
        HTTPRetriever(always_failing.url, timeout=2, retries=1, backoff=0.01, check=False).search("x", 1)


def test_env_over_http_through_the_factory(tiny_data, server_factory):
    server = server_factory()
    make = environment_factory("searchqa", {"data_dir": str(tiny_data), "retrieval_url": server.url, "topk": 2})
    env = make()
    env.reset("test-00000")
    obs = env.step("<search>Portugal</search>")
    assert obs.text.startswith("<information>Doc 1(Title: Doc for Portugal) Text about Portugal.\nDoc 2(Title:")


# -- data files ------------------------------------------------------------------------------


def test_search_r1_parquet_and_jsonl(tmp_path):
    prefix = "Answer the given question. ... For example, <answer> Beijing </answer>. Question: "
    rows = [  # Search-R1's processed layout; the first row also keeps the FlashRAG fields, the second does not
        {"id": "train_0", "question": "who wrote hamlet?", "golden_answers": ["William Shakespeare", "Shakespeare"],
         "data_source": "nq", "prompt": [{"role": "user", "content": prefix + "who wrote hamlet?\n"}],
         "ability": "fact-reasoning",
         "reward_model": {"style": "rule", "ground_truth": {"target": ["William Shakespeare", "Shakespeare"]}},
         "extra_info": {"split": "train", "index": 0}},
        {"id": None, "question": None, "golden_answers": None, "data_source": "hotpotqa",
         "prompt": [{"role": "user", "content": prefix + "where is the eiffel tower?\n"}],
         "ability": "fact-reasoning", "reward_model": {"style": "rule", "ground_truth": {"target": ["Paris"]}},
         "extra_info": {"split": "train", "index": 1}},
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    questions = read_questions(tmp_path / "train.parquet")
    assert [(q.question, q.golden_answers, q.data_source) for q in questions] == [
        ("who wrote hamlet?", ("William Shakespeare", "Shakespeare"), "nq"),
        ("where is the eiffel tower?", ("Paris",), "hotpotqa"),
    ]
    write_jsonl(tmp_path / "test.jsonl", [{"question": "capital of Poland?", "golden_answers": "Warsaw",
                                           "data_source": "popqa"}])
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    env = SearchQAEnv(data_dir=str(tmp_path), corpus=str(tmp_path / "corpus.jsonl"), cache_dir=str(tmp_path / "c"))
    assert len(env.task_ids("train")) == 2 and env.task_ids("test") == ["test-00000"]
    task, _ = env.reset("test-00000")
    assert task.task_type == "popqa" and env.question("test-00000").golden_answers == ("Warsaw",)


def test_missing_files_name_the_path_and_the_fix(tiny_data, tmp_path):
    with pytest.raises(EnvironmentConfigError, match=r"nope\.jsonl.*env\.kwargs\.corpus"):
        SearchQAEnv(data_dir=str(tiny_data), corpus=str(tmp_path / "nope.jsonl"))
    with pytest.raises(EnvironmentConfigError, match=r"missing\.parquet.*train_file.*dataset: synthetic"):
        SearchQAEnv(train_file=str(tmp_path / "missing.parquet"), corpus=str(tiny_data / "corpus.jsonl"))
    with pytest.raises(EnvironmentConfigError, match=r"has no train\.parquet"):
        SearchQAEnv(data_dir=str(tmp_path), corpus=str(tiny_data / "corpus.jsonl"))
    with pytest.raises(EnvironmentConfigError, match="retrieval_url"):
        SearchQAEnv(data_dir=str(tiny_data))
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "no answers here"}])
    with pytest.raises(EnvironmentConfigError, match=r"bad\.jsonl row 1: no golden answers"):
        SearchQAEnv(train_file=str(tmp_path / "bad.jsonl"), corpus=str(tiny_data / "corpus.jsonl"))
    with pytest.raises(EnvironmentConfigError, match="data_dir"):
        environment_factory("searchqa", {"dataset": "synthetic", "data_dir": str(tiny_data)})
    with pytest.raises(ValueError, match="no Search-QA data for split 'valid'"):
        files_env(tiny_data).task_ids("valid")


# -- synthetic data --------------------------------------------------------------------------


def test_same_seed_same_bytes(tmp_path):
    first = synthetic_dataset(tmp_path / "a", seed=3, num_train=30, num_test=10)
    second = synthetic_dataset(tmp_path / "b", seed=3, num_train=30, num_test=10)
    for name in ("corpus", "train", "test"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()
    assert generate(4, 30, 10)["train"] != generate(3, 30, 10)["train"]


def test_synthetic_questions_are_distinct_and_balanced():
    data = generate(0, 400, 100)
    questions = [row["question"] for row in data["train"] + data["test"]]
    assert len(set(questions)) == 500
    sources = [row["data_source"] for row in data["train"]]
    assert {s: sources.count(s) for s in set(sources)} == {f"synthetic_{k}hop": 100 for k in range(1, 5)}
    assert all(len(row["gold_chain"]) == int(row["data_source"][10]) for row in data["train"])


def test_replaying_the_gold_chain_wins_and_a_wrong_answer_loses(synth_env):
    assert synth_env.max_turns == 5  # 4 searches + the answer for a 4-hop question
    hops_seen = set()
    for task_id in synth_env.task_ids("test")[:12]:
        question = synth_env.question(task_id)
        task, obs = synth_env.reset(task_id)
        hops_seen.add(task.task_type)
        assert task.task_type == f"synthetic_{len(question.gold_chain)}hop"
        assert obs.privileged.endswith(f"<answer>{question.golden_answers[0]}</answer>")
        for title, sentence in question.gold_chain:
            obs = synth_env.step(f"<search>{title}</search>")
            assert sentence in obs.text and not obs.done
        assert "Plan from here: <answer>" in obs.privileged
        obs = synth_env.step(f"<answer>{question.golden_answers[0]}</answer>")
        assert (obs.reward, obs.done, obs.won) == (1.0, True, True)
        synth_env.reset(task_id)
        obs = synth_env.step(f"<answer>{question.gold_chain[-1][0]}</answer>")  # the last bridge, not the answer
        assert (obs.reward, obs.won) == (0.0, False)
    assert hops_seen == {f"synthetic_{k}hop" for k in range(1, 5)}


def test_every_gold_document_is_found_by_its_title(synth_env):
    retriever = synth_env.retriever
    titles = {title for split in ("train", "test") for task_id in synth_env.task_ids(split)
              for title, _ in synth_env.question(task_id).gold_chain}
    assert len(titles) > 100
    missed = [t for t in titles if t not in [p.title for p in retriever.search(t, synth_env.topk)]]
    assert missed == []
    top1 = sum(retriever.search(t, 1)[0].title == t for t in titles)
    assert top1 / len(titles) > 0.95


def test_synthetic_env_through_the_factory_shares_files(synth_cache):
    kwargs = {"dataset": "synthetic", "cache_dir": str(synth_cache), "num_train_tasks": 120, "num_test_tasks": 40}
    make = environment_factory("searchqa", kwargs)
    env_a, env_b = make(), make()
    assert env_a.retriever is env_b.retriever and env_a.questions is not None
    assert env_a.task_ids("train") == env_b.task_ids("train") and len(env_a.task_ids("test")) == 40
    train = {env_a.question(t).question for t in env_a.task_ids("train")}
    assert not train & {env_a.question(t).question for t in env_a.task_ids("test")}


def test_every_task_type_has_skills():
    mapping = yaml.safe_load((SKILLS / "mapping.yaml").read_text())
    for source in ("nq", "triviaqa", "popqa", "hotpotqa", "2wiki", "musique", "bamboogle",
                   *(f"synthetic_{k}hop" for k in range(1, 5))):
        assert all((SKILLS / f"{stem}.md").is_file() for stem in mapping[source]), source
    assert mapping["popqa"] == ["entity_lookup"] and mapping["hotpotqa"] == ["multi_hop"]
    assert mapping["nq"] == ["direct_retrieval"]
    for path in SKILLS.glob("*.md"):
        text = path.read_text()
        assert 900 < len(text.encode()) < 4096 and text.count("\n## ") >= 2, path.name


def test_concurrent_first_construction_builds_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    kwargs = {"dataset": "synthetic", "cache_dir": str(tmp_path), "seed": 7, "num_train_tasks": 20, "num_test_tasks": 0}
    with ThreadPoolExecutor(8) as pool:
        envs = list(pool.map(lambda _: SearchQAEnv(**kwargs), range(8)))
    assert len({id(env.retriever) for env in envs}) == 1 and len({id(env.questions["train"]) for env in envs}) == 1
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == ["v1-seed7-train20-test0-hops4"]

    def play(env):
        task_id = env.task_ids("train")[envs.index(env)]
        env.reset(task_id)
        question = env.question(task_id)
        for title, _ in question.gold_chain:
            env.step(f"<search>{title}</search>")
        return env.step(f"<answer>{question.golden_answers[0]}</answer>").reward

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(play, envs)) == [1.0] * 8
    with pytest.raises(ValueError, match="num_test_tasks above 0"):
        envs[0].task_ids("test")
