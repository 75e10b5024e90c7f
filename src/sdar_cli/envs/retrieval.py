"""Retrievers for the Search-QA environment: local BM25 over a JSONL corpus, or a Search-R1 server.

Both return `Passage`s that `format_passages` renders the way Search-R1 shows them to the model:

    Doc 1(Title: Paris) Paris is the capital of France ...
    Doc 2(Title: ...) ...

Corpus files are JSONL, one document per line, in either of two layouts:

    {"id": "0", "contents": "\\"Paris\\"\\nParis is the capital ..."}   Search-R1's wiki corpus: title line, text
    {"id": "0", "title": "Paris", "text": "Paris is the capital ..."}

`bm25_retriever(path)` builds the index of a corpus once per process (keyed by path, size and
modification time) and shares it between environment objects; with a cache folder it also saves
the index there and loads it on the next run. `HTTPRetriever` talks to Search-R1's retrieval
server (`search_r1/search/retrieval_server.py`): POST {url}/retrieve with
{"queries": [...], "topk": k, "return_scores": true}, answered by
{"result": [[{"document": {"id": ..., "contents": ...}, "score": ...}, ...], ...]}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import staged_dir
from .base import EnvironmentConfigError
from .retry import with_retries

logger = logging.getLogger(__name__)

#: bump when the saved index layout changes, so stale saved indexes are rebuilt
_INDEX_FORMAT = 1
SERVER_COMMAND = (
    "python search_r1/search/retrieval_server.py --index_path <e5_Flat.index> --corpus_path <wiki-18.jsonl> "
    "--topk 3 --retriever_name e5 --retriever_model intfloat/e5-base-v2 (in a Search-R1 checkout)"
)


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    score: float = 0.0


class RetrievalError(RuntimeError):
    """A search failed mid-run (server gone, bad answer); the episode that asked counts as failed."""


def passage_from_document(document: Mapping[str, Any], score: float = 0.0) -> Passage:
    """A Passage from a corpus or server document: {"contents": '"Title"\\ntext'} or {"title", "text"}."""
    if "contents" in document:
        contents = str(document["contents"])
        first, newline, rest = contents.partition("\n")
        if not newline:
            return Passage("", contents.strip(), score)
        return Passage(first.strip().strip('"').strip(), rest.strip(), score)
    if "text" in document:
        return Passage(str(document.get("title", "")).strip(), str(document["text"]).strip(), score)
    raise ValueError(f"a document needs 'contents' or 'title' and 'text', got keys {sorted(document)}")


def format_passages(passages: Sequence[Passage]) -> str:
    """Search-R1's rendering: one 'Doc i(Title: ...) text' line per passage."""
    lines = []
    for rank, passage in enumerate(passages, start=1):
        head = f"Doc {rank}(Title: {passage.title})" if passage.title else f"Doc {rank}"
        lines.append(f"{head} {passage.text}")
    return "\n".join(lines)


class Retriever(ABC):
    """Ranks passages for a query. Implementations are safe to call from several threads."""

    @abstractmethod
    def search(self, query: str, topk: int) -> list[Passage]:
        """The best `topk` passages for `query`, best first (fewer when fewer match)."""


# --------------------------------------------------------------------------------------------
# Local BM25
# --------------------------------------------------------------------------------------------


def read_corpus(path: str | Path) -> list[Passage]:
    """The documents of a JSONL corpus file; EnvironmentConfigError naming the line when malformed."""
    path = Path(path)
    if not path.is_file():
        raise EnvironmentConfigError(
            f"Search corpus not found: {path}. Point env.kwargs.corpus at a JSONL file with one document per line "
            '({"id": ..., "contents": "\\"Title\\"\\ntext"} or {"title": ..., "text": ...}), e.g. Search-R1\'s '
            "wiki-18.jsonl, or use env.kwargs.retrieval_url for a running Search-R1 retrieval server."
        )
    passages = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                passages.append(passage_from_document(json.loads(line)))
            except (ValueError, TypeError, AttributeError) as err:
                raise EnvironmentConfigError(
                    f"{path} line {number} is not a corpus document ({err}). Each line must be a JSON object with "
                    "'contents' ('\"Title\"\\ntext') or 'title' and 'text'."
                ) from None
    if not passages:
        raise EnvironmentConfigError(f"Search corpus {path} holds no documents; write one JSON document per line.")
    return passages


class BM25Retriever(Retriever):
    """BM25 (bm25s, English stopwords, no stemming) over passages' title and text. Immutable once built."""

    def __init__(self, passages: Sequence[Passage], index: Any = None):
        import bm25s  # a core dependency (skill retrieval uses it too)

        self._bm25s = bm25s
        self.passages = list(passages)
        if index is None:
            index = self._bm25s.BM25()
            index.index(self._tokenize([_index_text(p) for p in self.passages]), show_progress=False)
        self.index = index
        # bm25s keeps per-call scratch state; one query at a time costs ~0.5 ms and keeps it safe
        self._lock = threading.Lock()

    def _tokenize(self, texts: list[str], return_ids: bool = True) -> Any:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)

    def search(self, query: str, topk: int) -> list[Passage]:
        k = min(topk, len(self.passages))
        query_tokens = self._tokenize([query], return_ids=False)
        if k <= 0 or not query_tokens[0]:
            return []
        with self._lock:
            ranked, scores = self.index.retrieve(query_tokens, k=k, show_progress=False, n_threads=1)
        found = []
        for doc, score in zip(ranked[0].tolist(), scores[0].tolist()):
            if score > 0:  # a zero score shares no term with the query: not a hit
                passage = self.passages[int(doc)]
                found.append(Passage(passage.title, passage.text, float(score)))
        return found


def _index_text(passage: Passage) -> str:
    return f"{passage.title}\n{passage.text}" if passage.title else passage.text


_bm25_cache: dict[tuple[str, int, int], BM25Retriever] = {}
_bm25_lock = threading.Lock()


def bm25_retriever(corpus_path: str | Path, cache_dir: str | Path | None = None) -> BM25Retriever:
    """The shared BM25 retriever of a corpus file, built (or loaded from `cache_dir`) once per process.

    Keyed by the file's resolved path, size and modification time, so an edited corpus is re-indexed.
    """
    path = Path(corpus_path).expanduser()
    if not path.is_file():
        read_corpus(path)  # raises the explanatory error
    path = path.resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _bm25_lock:
        cached = _bm25_cache.get(key)
        if cached is None:
            cached = _build_bm25(path, key, Path(cache_dir).expanduser() if cache_dir else None)
            _bm25_cache[key] = cached
        return cached


def _build_bm25(path: Path, key: tuple[str, int, int], cache_dir: Path | None) -> BM25Retriever:
    started = time.perf_counter()
    passages = read_corpus(path)
    index_dir = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps([_INDEX_FORMAT, *key]).encode()).hexdigest()[:16]
        index_dir = cache_dir / "bm25" / f"{path.stem}-{digest}"
        if index_dir.is_dir():
            import bm25s

            try:
                index = bm25s.BM25.load(str(index_dir), show_progress=False, verbosity=0)
                logger.info("loaded the BM25 index of %s from %s", path, index_dir)
                return BM25Retriever(passages, index)
            except Exception as err:  # noqa: BLE001 - a broken saved index is rebuilt, not fatal
                logger.warning("ignoring the unreadable BM25 index %s (%s); rebuilding it", index_dir, err)
    retriever = BM25Retriever(passages)
    logger.info("indexed %d documents of %s in %.1f s", len(passages), path, time.perf_counter() - started)
    if index_dir is not None:
        _save_index(retriever, index_dir)
    return retriever


def _save_index(retriever: BM25Retriever, index_dir: Path) -> None:
    """Write the index next to its siblings, then rename it into place (readers never see half an index)."""
    try:
        with staged_dir(index_dir, done=Path.is_dir) as staging:  # done: another process saved it first
            retriever.index.save(str(staging), show_progress=False)
    except OSError as err:
        logger.warning("could not save the BM25 index to %s: %s", index_dir, err)


# --------------------------------------------------------------------------------------------
# Search-R1 retrieval server
# --------------------------------------------------------------------------------------------

_answered_urls: set[str] = set()
_answered_lock = threading.Lock()


def retrieve_endpoint(url: str) -> str:
    """The POST endpoint of a server address: 'http://host:8000' and 'http://host:8000/retrieve' both work."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EnvironmentConfigError(
            f"env.kwargs.retrieval_url '{url}' must start with http:// or https://, e.g. http://127.0.0.1:8000/retrieve"
        )
    return url if url.endswith("/retrieve") else url + "/retrieve"


class HTTPRetriever(Retriever):
    """A client of Search-R1's retrieval server, with a timeout per request and retries with backoff.

    Construction sends one query (once per URL and process) so a server that is down is reported as
    EnvironmentConfigError before training starts; later failures raise RetrievalError.
    """

    def __init__(self, url: str, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5,
                 check: bool = True):
        if timeout <= 0:
            raise ValueError(f"retrieval_timeout must be > 0 seconds, got {timeout}")
        if retries < 0:
            raise ValueError(f"retrieval_retries must be >= 0, got {retries}")
        self.url = retrieve_endpoint(url)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        if check:
            self._check_once()

    def _check_once(self) -> None:
        with _answered_lock:
            if self.url in _answered_urls:
                return
        try:
            self._post(["health check"], 1)
        except RetrievalError as err:
            raise EnvironmentConfigError(
                f"retrieval server at {self.url} did not answer within {self.timeout:g} s ({err}). Start it on the "
                f"GPU box first: {SERVER_COMMAND}; then set env.kwargs.retrieval_url to its address "
                "(or use env.kwargs.corpus for a local BM25 index instead)."
            ) from None
        with _answered_lock:
            _answered_urls.add(self.url)

    def search(self, query: str, topk: int) -> list[Passage]:
        return self.search_many([query], topk)[0]

    def search_many(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """One request for several queries (the server batches them on its GPU)."""
        def warn(attempt: int, err: BaseException) -> None:
            logger.warning("retrieval request %d/%d to %s failed: %s", attempt + 1, self.retries + 1, self.url, err)

        try:
            return with_retries(lambda: self._post(queries, topk), self.retries, self.backoff, (RetrievalError,), warn)
        except RetrievalError as err:
            raise RetrievalError(f"retrieval server at {self.url} failed {self.retries + 1} time(s): {err}") from None

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        payload = json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode()
        request = urllib.request.Request(self.url, data=payload, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            raise RetrievalError(f"HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise RetrievalError(f"{type(reason).__name__}: {reason}") from None
        try:
            return parse_server_answer(json.loads(body), len(queries))
        except (ValueError, TypeError, KeyError) as err:
            raise RetrievalError(f"unexpected answer ({err}): {body[:200]!r}") from None


def parse_server_answer(answer: Any, expected: int) -> list[list[Passage]]:
    """Passages per query from {"result": [[{"document": {...}, "score": s}, ...]]} (or bare documents)."""
    results = answer["result"] if isinstance(answer, dict) else answer
    if not isinstance(results, list) or len(results) != expected:
        raise ValueError(f"expected a list of {expected} result list(s)")
    parsed = []
    for hits in results:
        passages = []
        for hit in hits:
            if isinstance(hit, dict) and "document" in hit:
                passages.append(passage_from_document(hit["document"], float(hit.get("score") or 0.0)))
            else:
                passages.append(passage_from_document(hit))
        parsed.append(passages)
    return parsed
