"""SearchQAEnv: question answering with a search engine, the Search-R1 setup the SDAR paper trains on.

Each episode is one question. Every turn the agent either searches or answers:

    <search>birthplace of Ilsa Varnok</search>   -> the top passages, as the next observation:
        <information>Doc 1(Title: Ilsa Varnok) Ilsa Varnok was born in ... </information>
    <answer>Dravenford</answer>                  -> the episode ends

The reward is the exact match of the normalised answer (SQuAD normalisation: lower case, no
punctuation, no articles, single spaces) against any golden answer: 1.0 or 0. Token F1 is computed
too; both land in `env.last_metrics` and in the final observation's text. An episode has
`max_turns` turns, the answer included (4, as in the paper); running out of turns without an answer
scores 0. A reply that is neither tag uses up its turn and gets a reminder of the format.

Data (kwargs `dataset`):

    files      questions from Search-R1 style parquet or JSONL files (train_file / test_file, or a
               data_dir holding train.* and test.*), retrieval from a local BM25 index of a JSONL
               corpus (`corpus`) or from a running Search-R1 retrieval server (`retrieval_url`)
    synthetic  a seeded invented knowledge base with 1-4 hop questions (searchqa_synth.py), written
               once into the cache folder and searched with the same BM25 code

`Task.task_type` is the question's data source (nq, hotpotqa, synthetic_2hop, ...): it selects the
teacher's skills. The privileged context is the question's gold evidence chain when the data has one
(the synthetic data always does): the supporting sentences, which of them the agent has already
retrieved, and the remaining plan.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .base import Environment, EnvironmentConfigError, Observation, Task
from .retrieval import HTTPRetriever, Passage, Retriever, bm25_retriever, format_passages
from .searchqa_synth import MAX_HOPS, synthetic_dataset

SPLITS = ("train", "test")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")

PROMPT_TEMPLATE = (
    "Answer the question below. You can look things up with a search engine before answering.\n"
    "{task}\n"
    "{history}"
    "Turn {step}. {observation}\n\n"
    "Reply with exactly one action. To search, write <search>a short query</search>: the best matching "
    "passages come back inside <information> </information>. When you know the answer, write "
    "<answer>the answer</answer> with only the answer's words (a name, place, date or number), "
    "e.g. <answer>Lisbon</answer>. You may reason first inside <think> </think>."
)

FORMAT_REMINDER = (
    "That reply had no action. Search with <search>query</search> or answer with <answer>answer</answer>."
)


# --------------------------------------------------------------------------------------------
# Answer scoring (SQuAD)
# --------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golden_answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised golden answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(gold) for gold in golden_answers))


def token_f1(prediction: str, golden_answers: Sequence[str]) -> float:
    """The best token-level F1 against the golden answers (SQuAD v1: bag-of-words overlap)."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for gold in golden_answers:
        reference = normalize_answer(gold).split()
        common = sum((Counter(predicted) & Counter(reference)).values())
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


# --------------------------------------------------------------------------------------------
# Data: Search-R1 parquet / JSONL question files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    source_id: str = ""
    #: gold evidence: (document title, supporting sentence) per hop; empty when the data has none
    gold_chain: tuple[tuple[str, str], ...] = ()


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (what pandas reads from parquet) as plain lists and Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def question_from_row(row: Mapping[str, Any]) -> Question:
    """A Question from a flat row (question, golden_answers, data_source, id) or Search-R1's layout.

    Search-R1's processed parquet keeps `question` and `golden_answers` beside its training fields;
    rows holding only the training fields give the question from the last 'prompt' message (the text
    after its last 'Question:') and the answers from reward_model.ground_truth.target.
    """
    row = {key: _plain(value) for key, value in row.items()}
    question = row.get("question")
    if not question and row.get("prompt"):
        content = str(row["prompt"][-1]["content"]) if isinstance(row["prompt"], list) else str(row["prompt"])
        question = content.rpartition("Question:")[2] if "Question:" in content else content
    answers = row.get("golden_answers")
    if answers is None:
        truth = (row.get("reward_model") or {}).get("ground_truth")
        answers = truth.get("target") if isinstance(truth, Mapping) else truth
    if isinstance(answers, str):
        answers = [answers]
    if not question or not str(question).strip():
        raise ValueError("no question (expected 'question', or 'prompt' with the question in its last message)")
    if not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise ValueError("no golden answers (expected a list 'golden_answers' or reward_model.ground_truth.target)")
    chain = tuple((str(hop["title"]), str(hop["sentence"])) for hop in row.get("gold_chain") or ())
    return Question(
        question=" ".join(str(question).split()),
        golden_answers=tuple(str(a) for a in answers),
        data_source=str(row.get("data_source") or "unknown"),
        source_id=str(row.get("id") or ""),
        gold_chain=chain,
    )


def read_questions(path: str | Path) -> tuple[Question, ...]:
    """The questions of a .parquet or .jsonl file; EnvironmentConfigError saying what is wrong and how to fix it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EnvironmentConfigError(
            f"Search-QA data file not found: {path}. Give env.kwargs.train_file / test_file (or a data_dir holding "
            "train.parquet and test.parquet), e.g. the output of Search-R1's "
            "scripts/data_process/qa_search_train_merge.py, or use env.kwargs.dataset: synthetic for the offline "
            "synthetic questions."
        )
    if path.suffix == ".parquet":
        import pandas  # datasets depends on pandas and pyarrow, so both are present

        try:
            rows = pandas.read_parquet(path).to_dict(orient="records")
        except Exception as err:  # noqa: BLE001 - any reader error means the same thing to the user
            raise EnvironmentConfigError(f"{path} is not a readable parquet file: {err}") from None
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise EnvironmentConfigError(f"{path} line {number} is not JSON: {err}") from None
    else:
        raise EnvironmentConfigError(f"{path}: Search-QA data must be .parquet or .jsonl (one question per line).")
    questions = []
    for number, row in enumerate(rows, start=1):
        try:
            questions.append(question_from_row(row))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise EnvironmentConfigError(
                f"{path} row {number}: {err}. Each row needs 'question' and 'golden_answers' (a list of strings), "
                "plus 'data_source' (nq, hotpotqa, ...) to select skills."
            ) from None
    if not questions:
        raise EnvironmentConfigError(f"{path} holds no questions.")
    return tuple(questions)


_questions_cache: dict[tuple[str, int, int], tuple[Question, ...]] = {}
_questions_lock = threading.Lock()


def cached_questions(path: str | Path) -> tuple[Question, ...]:
    """read_questions, once per process for each (file, size, modification time)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return read_questions(path)  # raises the explanatory error
    stat = path.resolve().stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _questions_lock:
        if key not in _questions_cache:
            _questions_cache[key] = read_questions(path)
        return _questions_cache[key]


def default_cache_dir() -> Path:
    root = os.environ.get("SDAR_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "sdar") / "searchqa"


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


class SearchQAEnv(Environment):
    """Search-R1 question answering: <search>query</search> turns, then <answer>text</answer>.

    Task ids are "train-00017" / "test-00003" (the row number in the split's file). Rewards: 1.0 on
    the answer turn when it matches a golden answer exactly (after normalisation), 0 otherwise.
    """

    max_turns: int = 4
    skill_bank: ClassVar[str | None] = "search"
    #: an episode cut off before it answered scored nothing
    metric_defaults: ClassVar[dict[str, float]] = {"exact_match": 0.0, "f1": 0.0, "answered": 0.0}
    rollout_defaults: ClassVar[dict[str, Any]] = {
        "action_pattern": r"(<search>.*?</search>|<answer>.*?</answer>)",
        "stop_strings": ["</search>", "</answer>"],
        "invalid_action_penalty": 0.01,
        "history_turns": 4,
        "max_new_tokens": 512,
        "max_prompt_tokens": 4096,
        "prompt_template": PROMPT_TEMPLATE,
    }

    def __init__(
        self,
        dataset: str = "files",
        data_dir: str | None = None,
        train_file: str | None = None,
        test_file: str | None = None,
        corpus: str | None = None,
        retrieval_url: str | None = None,
        topk: int = 3,
        retrieval_timeout: float = 10.0,
        retrieval_retries: int = 2,
        max_turns: int | None = None,
        privileged_answer: bool = False,
        cache_dir: str | None = None,
        save_index: bool = True,
        seed: int = 0,
        num_train_tasks: int = 2000,
        num_test_tasks: int = 200,
        max_hops: int = MAX_HOPS,
    ) -> None:
        if topk < 1:
            raise ValueError(f"topk must be at least 1, got {topk}")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be at least 1, got {max_turns}")
        self.dataset = dataset
        self.topk = int(topk)
        self.privileged_answer = bool(privileged_answer)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if dataset == "synthetic":
            given = [name for name, value in (("data_dir", data_dir), ("train_file", train_file),
                                              ("test_file", test_file), ("corpus", corpus),
                                              ("retrieval_url", retrieval_url)) if value]
            if given:
                raise EnvironmentConfigError(
                    f"env.kwargs {', '.join(given)} apply to dataset: files; dataset: synthetic generates its own "
                    "questions and corpus (remove them, or set dataset: files)."
                )
            if not 1 <= max_hops <= MAX_HOPS:
                raise ValueError(f"max_hops must be 1..{MAX_HOPS}, got {max_hops}")
            if num_train_tasks < 1 or num_test_tasks < 0:
                raise ValueError("num_train_tasks must be >= 1 and num_test_tasks >= 0")
            files = synthetic_dataset(self.cache_dir, seed, num_train_tasks, num_test_tasks, max_hops)
            split_files = {"train": files.train, **({"test": files.test} if num_test_tasks else {})}
            corpus = str(files.corpus)
            # a k-hop question needs k searches and the answer turn
            self.max_turns = max_turns or max(type(self).max_turns, max_hops + 1)
        elif dataset == "files":
            split_files = _split_files(data_dir, train_file, test_file)
            self.max_turns = max_turns or type(self).max_turns
        else:
            raise EnvironmentConfigError(f"env.kwargs.dataset must be 'files' or 'synthetic', got {dataset!r}.")
        self.questions = {split: cached_questions(path) for split, path in split_files.items()}
        self.retriever = _make_retriever(corpus, retrieval_url, retrieval_timeout, retrieval_retries,
                                         self.cache_dir if save_index else None)
        self.last_metrics: dict[str, float] | None = None
        self._question: Question | None = None
        self._turns = 0
        self._searches = 0
        self._found_titles: set[str] = set()
        self._done = False

    # -- task ids --------------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        return [f"{split}-{i:05d}" for i in range(len(self._split(split)))]

    def _split(self, split: str) -> tuple[Question, ...]:
        if split not in self.questions:
            known = ", ".join(self.questions)
            if split not in SPLITS:
                hint = "the splits are 'train' and 'test'"
            elif self.dataset == "synthetic":
                hint = "set env.kwargs.num_test_tasks above 0"
            else:
                hint = f"give env.kwargs.{split}_file or put {split}.parquet in env.kwargs.data_dir"
            raise ValueError(f"no Search-QA data for split {split!r} (this environment has: {known}); {hint}")
        return self.questions[split]

    def question(self, task_id: str) -> Question:
        split, _, index = str(task_id).rpartition("-")
        questions = self._split(split)
        if not (index.isascii() and index.isdigit()) or int(index) >= len(questions):
            raise ValueError(
                f"unknown task id {task_id!r}; {split} ids run {split}-00000 .. {split}-{len(questions) - 1:05d}"
            )
        return questions[int(index)]

    # -- episodes --------------------------------------------------------------------------

    def reset(self, task_id: str) -> tuple[Task, Observation]:
        self._question = self.question(task_id)
        self._turns = self._searches = 0
        self._found_titles = set()
        self._done = False
        self.last_metrics = None
        task = Task(task_id=task_id, task_type=self._question.data_source,
                    description=f"Question: {self._question.question}")
        return task, self._observe(f"No search results yet. {self._turns_left_note()}")

    def step(self, action: str) -> Observation:
        """Play one reply: the whole tagged action, '<search>query</search>' or '<answer>text</answer>'."""
        question = self._require_episode()
        self._turns += 1
        match = re.search(r"<(search|answer)>(.*?)</\1>", str(action), re.DOTALL | re.IGNORECASE)
        kind, content = (match.group(1).lower(), " ".join(match.group(2).split())) if match else ("", "")
        if kind == "answer":
            return self._finish(content, question)
        out_of_turns = self._turns >= self.max_turns
        if kind == "search" and content and not out_of_turns:
            self._searches += 1
            passages = self.retriever.search(content, self.topk)
            self._found_titles.update(p.title.lower() for p in passages)
            return self._observe(f"{_information(passages)}\n{self._turns_left_note()}")
        if out_of_turns:
            self._done = True
            self.last_metrics = self._metrics(exact=0.0, f1=0.0, answered=False)
            return self._observe("Out of turns without an answer: score 0.")
        reminder = FORMAT_REMINDER if kind != "search" else "That search had no query; write <search>query</search>."
        return self._observe(f"{reminder} {self._turns_left_note()}")

    def _finish(self, answer: str, question: Question) -> Observation:
        exact = exact_match(answer, question.golden_answers)
        f1 = token_f1(answer, question.golden_answers)
        self._done = True
        self.last_metrics = self._metrics(exact=exact, f1=f1, answered=True)
        verdict = "correct" if exact else "wrong"
        text = (f"Your answer '{answer}' is {verdict} (exact match {exact:.0f}, F1 {f1:.2f}; accepted answers: "
                f"{'; '.join(question.golden_answers)}).")
        return self._observe(text, reward=exact, won=bool(exact))

    def _metrics(self, exact: float, f1: float, answered: bool) -> dict[str, float]:
        return {"exact_match": exact, "f1": f1, "answered": float(answered), "searches": float(self._searches),
                "turns": float(self._turns)}

    def _turns_left_note(self) -> str:
        left = self.max_turns - self._turns
        if left <= 1:
            return "This is your last turn: answer now with <answer>...</answer>."
        return f"Turns left: {left} (answering takes one)."

    def _require_episode(self) -> Question:
        if self._question is None:
            raise RuntimeError("call reset(task_id) before step()")
        if self._done:
            raise RuntimeError("the episode is over; call reset(task_id) to start another")
        return self._question

    def _observe(self, text: str, reward: float = 0.0, won: bool = False) -> Observation:
        return Observation(text=text, admissible_actions=[], reward=reward, done=self._done, won=won,
                           privileged="" if self._done else self.privileged_text(),
                           metrics=dict(self.last_metrics) if self._done and self.last_metrics else {})

    def privileged_text(self) -> str:
        """Teacher-only: the gold evidence chain, what of it is found, the plan from here (and the answer)."""
        question = self._require_episode()
        answer = question.golden_answers[0]
        if not question.gold_chain:
            return f"The correct answer is: {answer}." if self.privileged_answer else ""
        lines = ["Gold evidence for this question:"]
        plan = []
        for hop, (title, sentence) in enumerate(question.gold_chain, start=1):
            found = title.lower() in self._found_titles
            lines.append(f"{hop}. [{title}] {sentence}{' (already retrieved)' if found else ''}")
            if not found:
                plan.append(f"<search>{title}</search>")
        plan.append(f"<answer>{answer}</answer>")
        lines.append(f"Answer: {answer}")
        lines.append("Plan from here: " + ", then ".join(plan))
        return "\n".join(lines)

    def close(self) -> None:
        self._question = None


def _information(passages: Sequence[Passage]) -> str:
    body = format_passages(passages) if passages else "No document matches that query; try other words."
    return f"<information>{body}</information>"


def _split_files(data_dir: str | None, train_file: str | None, test_file: str | None) -> dict[str, Path]:
    """The question file of each split: explicit files win over data_dir/{train,test}.{parquet,jsonl}."""
    files: dict[str, Path] = {}
    if data_dir:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise EnvironmentConfigError(
                f"env.kwargs.data_dir {folder} is not a folder. It should hold train.parquet and test.parquet "
                "(Search-R1's scripts/data_process/qa_search_train_merge.py and qa_search_test_merge.py write "
                "them), or give train_file / test_file."
            )
        for split in SPLITS:
            found = [folder / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
            if found:
                files[split] = found[0]
    if train_file:
        files["train"] = Path(train_file).expanduser()
    if test_file:
        files["test"] = Path(test_file).expanduser()
    if "train" not in files:
        where = f"{data_dir} has no train.parquet or train.jsonl" if data_dir else "no data was given"
        raise EnvironmentConfigError(
            f"Search-QA needs training questions: {where}. Set env.kwargs.data_dir (a folder with train.parquet and "
            "test.parquet) or env.kwargs.train_file / test_file, or use env.kwargs.dataset: synthetic."
        )
    return files


def _make_retriever(corpus: str | None, url: str | None, timeout: float, retries: int,
                    index_cache: Path | None) -> Retriever:
    if corpus and url:
        raise EnvironmentConfigError(
            "give env.kwargs.corpus (local BM25) or env.kwargs.retrieval_url (a server), not both."
        )
    if url:
        return HTTPRetriever(url, timeout=timeout, retries=retries)
    if corpus:
        return bm25_retriever(corpus, index_cache)
    raise EnvironmentConfigError(
        "Search-QA needs a retriever: set env.kwargs.retrieval_url to a running Search-R1 retrieval server "
        "(e.g. http://127.0.0.1:8000/retrieve) or env.kwargs.corpus to a JSONL corpus for a local BM25 index."
    )
