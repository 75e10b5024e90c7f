"""Skill banks: the teacher's privileged context in the paper, and how a task's skills are chosen.

A bank is a folder of markdown files. Each `## Title` section of a file is one skill (a numbered
list of concrete strategies). `general.md` holds the skills every task gets; `<task_type>.md`
holds those of one task type. An optional `mapping.yaml` maps a task type to file stems when
several types share a file (Search-QA: data source -> strategy):

    bank/
      general.md
      multi_hop.md
      mapping.yaml        # {hotpotqa: [multi_hop], 2wiki: [multi_hop], nq: [direct_retrieval]}

Retrieval modes (teacher.skills.retrieval):
    rule   general skills + the task type's skills (the paper's rule-based retrieval)
    bm25   the top_k skills of the whole bank ranked by BM25 against the task description
    all    every skill of the bank
    none   no skills

Banks shipped with sdar live next to this file, one folder per environment; a config names one
("alfworld") or points at a folder of its own.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

SHIPPED_BANKS_DIR = Path(__file__).parent
GENERAL = "general"
RETRIEVAL_MODES = ("rule", "bm25", "all", "none")


class SkillBankError(ValueError):
    """A skill bank cannot be found or read; the message says how to fix it."""


@dataclass(frozen=True)
class Skill:
    source: str  # file stem: "general", "pick_and_place", ...
    title: str
    body: str

    def render(self) -> str:
        return f"## {self.title}\n{self.body}".rstrip()


def shipped_banks() -> list[str]:
    return sorted(p.name for p in SHIPPED_BANKS_DIR.iterdir() if p.is_dir() and any(p.glob("*.md")))


def resolve_bank_dir(bank: str) -> Path:
    """The folder of a shipped bank name or of a user's folder path; SkillBankError when there is none."""
    shipped = SHIPPED_BANKS_DIR / bank
    if "/" not in bank and "\\" not in bank and shipped.is_dir():
        return shipped
    folder = Path(bank).expanduser()
    if folder.is_dir():
        if not any(folder.glob("*.md")):
            raise SkillBankError(f"teacher.skills.bank '{bank}' holds no .md skill files.")
        return folder
    raise SkillBankError(
        f"teacher.skills.bank '{bank}' is neither a shipped bank ({', '.join(shipped_banks())}) nor an existing "
        "folder of markdown skill files."
    )


def parse_skills(text: str, source: str) -> list[Skill]:
    """The `## Title` sections of a markdown file; text before the first section is ignored (a file title)."""
    skills = []
    for match in re.finditer(r"^##[ \t]+(.+?)[ \t]*\n(.*?)(?=^##[ \t]|\Z)", text, re.MULTILINE | re.DOTALL):
        title, body = match.group(1).strip(), match.group(2).strip()
        if body:
            skills.append(Skill(source, title, body))
    return skills


class SkillBank:
    """The skills of one bank, grouped by file stem, and the task-type mapping."""

    def __init__(self, skills_by_file: dict[str, list[Skill]], mapping: dict[str, list[str]] | None = None):
        self.skills_by_file = skills_by_file
        self.mapping = mapping or {}
        self._index = None
        self._index_lock = threading.Lock()

    @classmethod
    def load(cls, bank: str) -> SkillBank:
        return _load_bank(str(resolve_bank_dir(bank).resolve()))

    @property
    def all_skills(self) -> list[Skill]:
        return [skill for stem in sorted(self.skills_by_file) for skill in self.skills_by_file[stem]]

    def files_for(self, task_type: str) -> list[str]:
        """File stems rule retrieval uses for a task type: general first, then the mapped or same-named file."""
        stems = self.mapping.get(task_type, [task_type])
        return [GENERAL] + [stem for stem in stems if stem != GENERAL]

    def retrieve(self, task_type: str, description: str, mode: str, top_k: int) -> list[Skill]:
        if mode == "none":
            return []
        if mode == "all":
            return self.all_skills
        if mode == "rule":
            return [skill for stem in self.files_for(task_type) for skill in self.skills_by_file.get(stem, [])]
        if mode == "bm25":
            return self._bm25(description, top_k)
        raise SkillBankError(f"unknown skill retrieval mode '{mode}'; use one of {', '.join(RETRIEVAL_MODES)}.")

    def _bm25(self, query: str, top_k: int) -> list[Skill]:
        import bm25s

        skills = self.all_skills
        if not skills or top_k <= 0:
            return []
        with self._index_lock:
            if self._index is None:
                index = bm25s.BM25()
                index.index(bm25s.tokenize([f"{s.title}\n{s.body}" for s in skills], show_progress=False), show_progress=False)
                self._index = index
        k = min(top_k, len(skills))
        ranked, _ = self._index.retrieve(bm25s.tokenize([query], show_progress=False), k=k, show_progress=False)
        return [skills[int(i)] for i in ranked[0]]


@lru_cache(maxsize=32)
def _load_bank(folder: str) -> SkillBank:
    root = Path(folder)
    skills_by_file = {path.stem: parse_skills(path.read_text(encoding="utf-8"), path.stem) for path in sorted(root.glob("*.md"))}
    mapping: dict[str, list[str]] = {}
    mapping_file = root / "mapping.yaml"
    if mapping_file.is_file():
        try:
            loaded = yaml.safe_load(mapping_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise SkillBankError(f"{mapping_file} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise SkillBankError(f"{mapping_file} must map task types to lists of file stems.")
        for task_type, stems in loaded.items():
            stems = [stems] if isinstance(stems, str) else list(stems or [])
            missing = [stem for stem in stems if stem not in skills_by_file]
            if missing:
                raise SkillBankError(f"{mapping_file}: '{task_type}' maps to missing skill file(s) {missing}.")
            mapping[str(task_type)] = [str(stem) for stem in stems]
    return SkillBank(skills_by_file, mapping)


def render_skills(skills: list[Skill]) -> str:
    return "\n\n".join(skill.render() for skill in skills)
