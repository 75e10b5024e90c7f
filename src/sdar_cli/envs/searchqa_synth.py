"""A seeded, offline multi-hop QA data set for the Search-QA environment.

An invented knowledge base (people, cities, companies, countries and their languages) is rendered
as one encyclopedia-style document per entity: a few sentences that state its facts, plus
distractor sentences (years, populations, hobbies) no question asks about. Questions follow a chain
of 1-4 functional relations from a named entity:

    1 hop  Who is the founder of Quorvex Labs?
    3 hops What is the official language of the country of the birthplace of Ilsa Varnok?

Each question keeps its gold chain: per hop, the title of the document to find and the sentence that
states the fact (the teacher's privileged context). Data sources are 'synthetic_1hop' ..
'synthetic_4hop'. Everything comes from `random.Random` seeded by (seed, purpose), so the same
arguments give byte-identical files on any machine. `synthetic_dataset` writes them once into a
cache folder:

    corpus.jsonl   {"id", "contents": '"Title"\\ntext'}       (Search-R1's corpus layout)
    train.jsonl    {"id", "question", "golden_answers", "data_source", "gold_chain": [{"title", "sentence"}]}
    test.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .. import atomic

#: bump when generation changes, so cached files of an older generator are not reused
GENERATOR_VERSION = 1
MAX_HOPS = 4

# sizes of the knowledge base: about 600 distinct 1-hop facts, far more multi-hop chains
NUM_COUNTRIES = 12
CITIES_PER_COUNTRY = 5
NUM_COMPANIES = 60
NUM_PEOPLE = 200

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t",
           "th", "v", "vr", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "y")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "v")
_COUNTRY_SUFFIXES = ("ia", "land", "mark", "stan", "ora", "esh")
_CITY_SUFFIXES = ("ton", "burg", "ford", "vale", "mouth", "haven", "grad", "port")
_LANGUAGE_SUFFIXES = ("ish", "ese", "ic", "an")
_COMPANY_KINDS = ("Industries", "Labs", "Works", "Systems", "Foods", "Motors", "Textiles", "Shipping", "Media",
                  "Robotics")
_INDUSTRIES = ("steel", "software", "food", "shipping", "textile", "media", "energy", "robotics", "furniture",
               "pharmaceutical")
_PROFESSIONS = ("engineer", "painter", "physician", "architect", "chemist", "novelist", "economist", "pilot",
                "lawyer", "composer", "botanist", "sculptor")
_HOBBIES = ("chess", "sailing", "pottery", "birdwatching", "fencing", "cycling", "gardening", "astronomy",
            "archery", "calligraphy")
_LANDMARKS = ("an old stone bridge", "a covered market", "a clock tower", "a botanical garden", "a lighthouse",
              "a river harbour", "a hilltop fortress", "a glass cathedral")
_CURRENCY_NAMES = ("crown", "mark", "florin", "dinar", "thaler", "real", "ducat", "shilling")


@dataclass
class _Entity:
    name: str
    kind: str  # person, city, company, country, language
    facts: dict[str, str] = field(default_factory=dict)  # relation -> object name
    extra: dict[str, str] = field(default_factory=dict)  # distractor attributes


@dataclass(frozen=True)
class _Relation:
    subject: str  # entity kind it starts from
    object: str  # entity kind it leads to
    phrase: str  # noun phrase of the object, given the subject's phrase {x}


RELATIONS: dict[str, _Relation] = {
    "born_in": _Relation("person", "city", "the birthplace of {x}"),
    "employer": _Relation("person", "company", "the employer of {x}"),
    "founder": _Relation("company", "person", "the founder of {x}"),
    "headquarters": _Relation("company", "city", "the headquarters city of {x}"),
    "country": _Relation("city", "country", "the country of {x}"),
    "mayor": _Relation("city", "person", "the mayor of {x}"),
    "capital": _Relation("country", "city", "the capital of {x}"),
    "language": _Relation("country", "language", "the official language of {x}"),
}


def _fact_sentence(subject: _Entity, relation: str, obj: str) -> str:
    """The document sentence that states one fact (also the gold supporting sentence of that hop)."""
    s = subject.name
    return {
        "born_in": f"{s} was born in {obj}.",
        "employer": f"{s} works for {obj}.",
        "founder": f"{s} was founded by {obj}.",
        "headquarters": f"{s} has its headquarters in {obj}.",
        "country": f"{s} is a city in {obj}.",
        "mayor": f"The mayor of {s} is {obj}.",
        "capital": f"The capital of {s} is {obj}.",
        "language": f"The official language of {s} is {obj}.",
    }[relation]


def _rng(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose, derived from the seed by a stable hash (never Python's hash())."""
    digest = hashlib.sha256(f"searchqa-synth:{GENERATOR_VERSION}:{seed}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


class _Names:
    """Invented names, unique case-insensitively, every word at least 3 letters."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def make(self, build) -> str:
        while True:
            name = build(self.rng)
            words = name.split()
            if all(len(w) >= 3 for w in words) and name.lower() not in self.used:
                self.used.add(name.lower())
                return name


def build_knowledge_base(seed: int) -> dict[str, _Entity]:
    """All entities by name, in creation order (dicts keep it), from the seed alone."""
    rng = _rng(seed, "kb")
    names = _Names(rng)
    entities: dict[str, _Entity] = {}

    def add(entity: _Entity) -> _Entity:
        entities[entity.name] = entity
        return entity

    countries, cities = [], []
    for _ in range(NUM_COUNTRIES):
        stem = names.make(lambda r: _word(r, 2).capitalize())
        country = add(_Entity(names.make(lambda r, s=stem: s + r.choice(_COUNTRY_SUFFIXES)), "country"))
        language = add(_Entity(names.make(lambda r, s=stem: s + r.choice(_LANGUAGE_SUFFIXES)), "language"))
        country.facts["language"] = language.name
        language.extra["country"] = country.name
        language.extra["age"] = str(rng.randint(3, 15))
        country.extra["population"] = f"{rng.randint(2, 90)} million"
        country.extra["currency"] = rng.choice(_CURRENCY_NAMES)
        own = []
        for _ in range(CITIES_PER_COUNTRY):
            city_name = names.make(lambda r: (_word(r, r.randint(1, 2)) + r.choice(_CITY_SUFFIXES)).capitalize())
            city = add(_Entity(city_name, "city"))
            city.facts["country"] = country.name
            city.extra["population"] = f"{rng.randint(20, 900) * 1000:,}"
            city.extra["landmark"] = rng.choice(_LANDMARKS)
            own.append(city)
        country.facts["capital"] = rng.choice(own).name
        countries.append(country)
        cities.extend(own)

    people = []
    for _ in range(NUM_PEOPLE):
        person = add(_Entity(names.make(lambda r: f"{_word(r, 2).capitalize()} {_word(r, 2).capitalize()}"), "person"))
        person.facts["born_in"] = rng.choice(cities).name
        person.extra["profession"] = rng.choice(_PROFESSIONS)
        person.extra["year"] = str(rng.randint(1930, 1995))
        person.extra["hobby"] = rng.choice(_HOBBIES)
        people.append(person)

    founders = rng.sample(people, NUM_COMPANIES)
    companies = []
    for founder in founders:
        company_name = names.make(lambda r: f"{_word(r, 2).capitalize()} {r.choice(_COMPANY_KINDS)}")
        company = add(_Entity(company_name, "company"))
        company.facts["founder"] = founder.name
        company.facts["headquarters"] = rng.choice(cities).name
        company.extra["year"] = str(rng.randint(1950, 2015))
        company.extra["industry"] = rng.choice(_INDUSTRIES)
        company.extra["staff"] = f"{rng.randint(1, 400) * 50:,}"
        companies.append(company)
    for person in people:
        person.facts["employer"] = rng.choice(companies).name
    for city in cities:
        city.facts["mayor"] = rng.choice(people).name
    return entities


def render_document(entity: _Entity) -> str:
    """The entity's document text: its fact sentences interleaved with distractor sentences."""
    n, x, f = entity.name, entity.extra, entity.facts
    if entity.kind == "person":
        sentences = [f"{n} is {_article(x['profession'])} {x['profession']} born in {x['year']}.",
                     _fact_sentence(entity, "born_in", f["born_in"]),
                     _fact_sentence(entity, "employer", f["employer"]),
                     f"In spare time {n} enjoys {x['hobby']}."]
    elif entity.kind == "company":
        sentences = [f"{n} is {_article(x['industry'])} {x['industry']} company established in {x['year']}.",
                     _fact_sentence(entity, "founder", f["founder"]),
                     _fact_sentence(entity, "headquarters", f["headquarters"]),
                     f"{n} employs about {x['staff']} people."]
    elif entity.kind == "city":
        sentences = [_fact_sentence(entity, "country", f["country"]),
                     f"{n} has a population of about {x['population']} and is known for {x['landmark']}.",
                     _fact_sentence(entity, "mayor", f["mayor"])]
    elif entity.kind == "country":
        sentences = [f"{n} is a country with about {x['population']} inhabitants.",
                     _fact_sentence(entity, "capital", f["capital"]),
                     _fact_sentence(entity, "language", f["language"]),
                     f"The currency of {n} is the {x['currency']}."]
    else:  # language: no outgoing facts, so no question starts here
        sentences = [f"{n} is the language spoken in {x['country']}.",
                     f"{n} has its own alphabet and a written tradition of {x['age']} centuries."]
    return " ".join(sentences)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def corpus_rows(entities: dict[str, _Entity]) -> list[dict]:
    return [{"id": str(i), "contents": f'"{e.name}"\n{render_document(e)}'} for i, e in enumerate(entities.values())]


def _question(entities: dict[str, _Entity], start: _Entity, relations: list[str]) -> dict | None:
    """The question for a relation chain from `start`, or None when the chain revisits an entity."""
    seen = {start.name}
    chain = []
    subject = start
    for relation in relations:
        if relation not in subject.facts:
            return None
        obj = subject.facts[relation]
        if obj in seen:
            return None
        chain.append({"title": subject.name, "sentence": _fact_sentence(subject, relation, obj)})
        seen.add(obj)
        subject = entities[obj]
    phrase = start.name
    for relation in relations:
        phrase = RELATIONS[relation].phrase.format(x=phrase)
    opener = "Who is" if subject.kind == "person" else "What is"
    return {"question": f"{opener} {phrase}?", "golden_answers": [subject.name],
            "data_source": f"synthetic_{len(relations)}hop", "gold_chain": chain}


def generate(seed: int, num_train: int, num_test: int, max_hops: int = MAX_HOPS) -> dict[str, list[dict]]:
    """Corpus, train and test rows. Hop counts cycle 1..max_hops; no question appears twice anywhere."""
    if not 1 <= max_hops <= MAX_HOPS:
        raise ValueError(f"max_hops must be 1..{MAX_HOPS}, got {max_hops}")
    entities = build_knowledge_base(seed)
    starts = [e for e in entities.values() if e.facts]
    rng = _rng(seed, "questions")
    asked: set[str] = set()
    rows: list[dict] = []
    hops = 0
    while len(rows) < num_train + num_test:
        wanted = 1 + hops % max_hops
        hops += 1
        for _ in range(2000):  # draw chains until an unasked, cycle-free one of this length turns up
            start = rng.choice(starts)
            relations, kind = [], start.kind
            for _ in range(wanted):
                options = sorted(name for name, r in RELATIONS.items() if r.subject == kind)
                if not options:
                    break
                relation = rng.choice(options)
                relations.append(relation)
                kind = RELATIONS[relation].object
            if len(relations) != wanted:
                continue
            row = _question(entities, start, relations)
            if row is not None and row["question"] not in asked:
                asked.add(row["question"])
                rows.append(row)
                break
        else:  # this hop count is exhausted; the others still have room
            if hops > 10 * (num_train + num_test) + 100:
                raise ValueError(f"cannot generate {num_train + num_test} distinct questions; ask for fewer")
    train, test = rows[:num_train], rows[num_train:]
    for split, split_rows in (("train", train), ("test", test)):
        for i, row in enumerate(split_rows):
            row["id"] = f"{split}-{i}"
    return {"corpus": corpus_rows(entities), "train": train, "test": test}


@dataclass(frozen=True)
class SyntheticFiles:
    folder: Path
    corpus: Path
    train: Path
    test: Path


_write_lock = threading.Lock()


def synthetic_dataset(cache_dir: str | Path, seed: int, num_train: int, num_test: int,
                      max_hops: int = MAX_HOPS) -> SyntheticFiles:
    """The data set's files in `cache_dir`, generated on first use (thread- and process-safe)."""
    params = f"v{GENERATOR_VERSION}-seed{seed}-train{num_train}-test{num_test}-hops{max_hops}"
    folder = Path(cache_dir).expanduser() / "synthetic" / params
    files = SyntheticFiles(folder, folder / "corpus.jsonl", folder / "train.jsonl", folder / "test.jsonl")
    with _write_lock:
        if not all(p.is_file() for p in (files.corpus, files.train, files.test)):
            data = generate(seed, num_train, num_test, max_hops)
            folder.mkdir(parents=True, exist_ok=True)
            for name, rows in data.items():
                _write_jsonl(folder / f"{name}.jsonl", rows)
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written whole (atomic.write_text): a reader never sees a half-written file."""
    atomic.write_text(path, "".join(json.dumps(row, sort_keys=True, ensure_ascii=True) + "\n" for row in rows))
