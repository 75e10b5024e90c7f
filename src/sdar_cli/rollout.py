"""Multi-turn episodes -> turn-level training samples, token-in, token-out.

All active episodes of a rollout batch are generated together, one turn at a time. Each turn of
each episode becomes one `TurnSample` whose `response_ids` are exactly the ids the policy sampled:
they are never decoded and re-tokenised. The decoded text is used only to read the action.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .config import RolloutSettings, TeacherSettings
from .envs.base import Environment, Observation, Task
from .skills import SkillBank, render_skills
from .prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    canonical_action,
    judge_action,
    next_action_context,
    parse_action,
    render_user_message,
)

logger = logging.getLogger(__name__)

#: a policy maps a batch of prompt token-id lists to a batch of sampled response token-id lists. A policy
#: whose sampler's log-probs differ from the trainer's (vLLM) also sets `sampler_logps` after each call: one
#: list per response, the log-prob of each sampled id; they are kept on the turn-samples.
Policy = Callable[[list[list[int]]], list[list[int]]]

INVALID_ACTION_NOTE = "Your last response had no admissible action, so nothing happened."


@dataclass
class TurnSample:
    """One turn of one episode: the unit the trainer learns from."""

    task_id: str
    task_type: str
    group: int
    episode: int
    turn: int
    prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]
    action: str | None
    valid: bool
    truncated: bool
    privileged: str
    reward: float = 0.0
    sampler_logps: list[float] | None = None  # the sampler's log-prob of each response id (vLLM only)


@dataclass
class EpisodeResult:
    task_id: str
    task_type: str
    group: int
    episode: int
    turns: int = 0
    won: bool = False
    outcome_reward: float = 0.0
    invalid_actions: int = 0
    env_error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _EpisodeState:
    env: Environment
    result: EpisodeResult
    task: Task | None = None
    observation: Observation | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    last_action_invalid: bool = False
    done: bool = False
    #: an environment call ran past its timeout: the object is abandoned (never called again, not even close)
    hung: bool = False

    def shown_observation(self) -> str:
        """The observation text the student sees, with a note when its last action was invalid."""
        if self.last_action_invalid:
            return f"{INVALID_ACTION_NOTE} {self.observation.text}"
        return self.observation.text


#: how many tasks' contexts the renderer keeps to draw `teacher.context: shuffled` controls from
SHUFFLE_POOL_TASKS = 256


class RecordedExpert:
    """Stands in for an environment at a state whose expert action is already known: TurnRenderer asks it only
    for that action (the rollout reads it once per turn, bounded and failure-checked like a step)."""

    def __init__(self, action: str | None):
        self.action = action

    def expert_action(self) -> str | None:
        return self.action


class TurnRenderer:
    """Builds the student and teacher prompt ids of a turn.

    The teacher's prompt holds the privileged block (teacher.context_template around the context) where
    teacher.placement says: `prefix` puts its tokens before the student's templated prompt ids (official
    SDAR); `user_start` / `user_end` put its text at the start / end of the user message, rendered again
    through the chat template. Only the prompt side differs: the response ids are the student's.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        rollout: RolloutSettings,
        teacher: TeacherSettings,
        skills_in_student_prompt: bool = False,
    ):
        """`skills_in_student_prompt` (Skill-GRPO): the student's prompt starts with the task's skills, put in
        teacher.context_template as the teacher's would be."""
        self.tokenizer = tokenizer
        self.skills_in_student_prompt = skills_in_student_prompt
        self.rollout = rollout
        self.teacher = teacher
        self.template = rollout.prompt_template or DEFAULT_PROMPT_TEMPLATE
        self.truncated_prompts = 0
        uses_skills = teacher.context in ("skills", "both") and teacher.skills.bank is not None
        self.skill_bank = SkillBank.load(teacher.skills.bank) if uses_skills else None
        self._skills_text: dict[tuple[str, str], str] = {}
        self._skills_lock = threading.Lock()
        #: task id -> (its latest next_action context, token count), the pool `shuffled` draws from
        self._context_pool: dict[str, tuple[str, int]] = {}
        #: `shuffled` turns that found no other task's context yet and showed the header only
        self.shuffled_fallbacks = 0

    def student_prompt_text(
        self,
        task: Task,
        history: Sequence[tuple[str, str]],
        observation_text: str,
        admissible_actions: list[str],
        window: int | None = None,
    ) -> str:
        """The templated student prompt showing the last `window` history pairs (default rollout.history_turns)."""
        return self.chat_prompt_text(self.user_message(task, history, observation_text, admissible_actions, window))

    def user_message(
        self,
        task: Task,
        history: Sequence[tuple[str, str]],
        observation_text: str,
        admissible_actions: list[str],
        window: int | None = None,
    ) -> str:
        window = self.rollout.history_turns if window is None else window
        return render_user_message(self.template, task.description, history, window, observation_text, admissible_actions)

    def chat_prompt_text(self, user: str) -> str:
        """A user message through the chat template, with the generation prompt and rollout.response_prefix."""
        messages = [{"role": "user", "content": user}]
        if self.rollout.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.rollout.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + self.rollout.response_prefix

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def turn_prompt_ids(
        self,
        task: Task,
        history: Sequence[tuple[str, str]],
        observation_text: str,
        admissible_actions: list[str],
        privileged: str = "",
    ) -> tuple[list[int], list[int]]:
        """The student and teacher prompt ids of a turn, each within rollout.max_prompt_tokens by one rule.

        The teacher's is the privileged block then a student prompt (teacher.placement prefix), or the user
        message with the block at its start or end through the chat template (user_start, user_end). A prompt
        too long drops the oldest
        history pairs first (the chat template's head, the task and the current observation stay); if it is
        still too long without history, its middle is cut, keeping its head (template, task, prefix) and its
        tail (instructions and the generation prompt). `truncated_prompts` counts the turns shortened.
        """
        encoded: dict[int, list[int]] = {}  # the prompt ids by history window, shared by both prompts

        def prompt_ids(window: int) -> list[int]:
            if window not in encoded:
                text = self.student_prompt_text(task, history, observation_text, admissible_actions, window)
                encoded[window] = self.encode(text)
            return encoded[window]

        widest = min(self.rollout.history_turns, len(history))
        student_prefix = self.teacher_prefix_ids(self.skills_text(task)) if self.skills_in_student_prompt else []
        student, cut_student = self._fitted(prompt_ids, widest, student_prefix)
        block = self.privileged_block(privileged)
        if block and self.teacher.placement != "prefix":

            def teacher_ids(window: int) -> list[int]:
                user = self.user_message(task, history, observation_text, admissible_actions, window)
                user = block + user if self.teacher.placement == "user_start" else user.rstrip() + "\n\n" + block.rstrip()
                return self.encode(self.chat_prompt_text(user))

            teacher, cut_teacher = self._fitted(teacher_ids, widest, [])
        else:
            teacher, cut_teacher = self._fitted(prompt_ids, widest, self.encode(block) if block else [])
        self.truncated_prompts += cut_student or cut_teacher
        return student, teacher

    def _fitted(self, prompt_ids: Callable[[int], list[int]], widest: int, prefix_ids: list[int]) -> tuple[list[int], bool]:
        """prefix + the prompt with the widest history window that fits, else the middle-cut; and whether cut."""
        limit = self.rollout.max_prompt_tokens
        for window in range(widest, -1, -1):
            ids = prefix_ids + prompt_ids(window)
            if len(ids) <= limit:
                return ids, window < widest
        head = limit // 2
        return ids[:head] + ids[len(ids) - (limit - head) :], True

    def skills_text(self, task: Task) -> str:
        """The task's retrieved skills, rendered (the same for every turn of the task: computed once)."""
        if self.skill_bank is None:
            return ""
        key = (task.task_type, task.description)
        with self._skills_lock:
            if key not in self._skills_text:
                settings = self.teacher.skills
                skills = self.skill_bank.retrieve(task.task_type, task.description, settings.retrieval, settings.top_k)
                self._skills_text[key] = render_skills(skills)
            return self._skills_text[key]

    def privileged_context(self, task: Task, plan: str, env: Environment | None = None) -> str:
        """What the teacher is shown (teacher.context): the task's skills, the expert plan, or both; the plan
        and the expert's next action (`env.expert_action()` in the current state); another task's such context
        (shuffled); or nothing (none: the block is the context_template's header only)."""
        context = self.teacher.context
        if context == "none":
            return ""
        if context in ("next_action", "shuffled"):
            own = next_action_context(plan, env.expert_action() if env is not None else None)
            if context == "next_action":
                return own
            self.remember_contexts([(task, plan, env)])
            return self._shuffled_context(task.task_id, own)
        parts = []
        if self.teacher.context in ("skills", "both"):
            parts.append(self.skills_text(task))
        if self.teacher.context in ("plan", "both"):
            parts.append(plan)
        return "\n\n".join(part for part in parts if part)

    def remember_contexts(self, states: Iterable[tuple[Task, str, Environment | None]]) -> None:
        """Add (task, plan, env) states' next_action contexts to the pool `shuffled` draws from (a no-op for other
        contexts); the rollout adds every episode of a turn first, so each finds the others' contexts."""
        if self.teacher.context != "shuffled":
            return
        for task, plan, env in states:
            text = next_action_context(plan, env.expert_action() if env is not None else None)
            self._context_pool.pop(task.task_id, None)
            self._context_pool[task.task_id] = (text, len(self.encode(text)))
        while len(self._context_pool) > SHUFFLE_POOL_TASKS:
            del self._context_pool[next(iter(self._context_pool))]

    def _shuffled_context(self, task_id: str, own: str) -> str:
        """Another task's context whose token count is nearest to `own`'s (ties: a stable pseudo-random pick)."""
        others = [(other, text, length) for other, (text, length) in self._context_pool.items() if other != task_id]
        if not others:
            self.shuffled_fallbacks += 1
            return ""
        length = len(self.encode(own))
        _, text, _ = min(
            others, key=lambda item: (abs(item[2] - length), zlib.crc32(f"{task_id}|{item[0]}".encode()))
        )
        return text

    def privileged_block(self, privileged: str) -> str:
        """The text the teacher's prompt adds: context_template around the context ('' when there is no
        context, except for teacher.context none, whose block is the template's header)."""
        if not privileged and self.teacher.context != "none":
            return ""
        return self.teacher.context_template.format(context=privileged)

    def teacher_block_ids(self, privileged: str) -> list[int]:
        """The privileged block's tokens: what the teacher's prompt adds, in any placement."""
        block = self.privileged_block(privileged)
        return self.encode(block) if block else []

    def teacher_prefix_ids(self, privileged: str) -> list[int]:
        if not privileged:
            return []
        prefix = self.teacher.context_template.format(context=privileged)
        return self.tokenizer(prefix, add_special_tokens=False)["input_ids"]


class HFPolicy:
    """Samples responses from a (PEFT-wrapped) causal LM in left-padded batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        rollout: RolloutSettings,
        max_batch_size: int = 64,
        do_sample: bool = True,
        temperature: float | None = None,
    ):
        """`temperature` overrides rollout.temperature (evaluation samples cooler than training)."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.generation_config = GenerationConfig(
            do_sample=do_sample,
            temperature=(temperature or rollout.temperature) if do_sample else None,
            top_p=rollout.top_p if do_sample else None,
            top_k=0 if do_sample else None,  # sample the full distribution the trainer scores
            max_new_tokens=rollout.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_strings=rollout.stop_strings or None,
            use_cache=True,  # TRL turns the model config's use_cache off for training
        )
        self.stop_strings = list(rollout.stop_strings)
        self.stop_end_ids = stop_string_end_ids(tokenizer, self.stop_strings)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        responses: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch_size):
            responses.extend(self._generate(prompts[start : start + self.max_batch_size]))
        return responses

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self.generation_config,
            tokenizer=self.tokenizer,
        )
        return [
            sampled_response(row, self.tokenizer.eos_token_id, self.stop_strings, self.tokenizer.decode, self.stop_end_ids)
            for row in output[:, width:].tolist()
        ]


def sampled_response(
    ids: list[int],
    eos_token_id: int | list[int],
    stop_strings: Sequence[str],
    decode: Callable[[list[int]], str],
    stop_end_ids: frozenset[int] = frozenset(),
) -> list[int]:
    """The ids the policy sampled, without the padding `generate` appends to finished rows.

    A row ends at its first end-of-sequence token (kept: it was sampled) or at the first token that
    completes a stop string (generation's own stop rule). Finding the end this way, rather than at
    the first pad id, matters when the pad id is the eos id, as in many chat models.

    Only a token in `stop_end_ids` (`stop_string_end_ids`: those whose text holds a stop string's last
    character) can complete a stop string, so the row's text is decoded only at such tokens: once per
    row in practice, never once per token.
    """
    stops = set(eos_token_id) if isinstance(eos_token_id, list) else {eos_token_id}
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
        if token in stop_end_ids:
            text = decode(ids[: position + 1])
            if any(s in text for s in stop_strings):
                return ids[: position + 1]
    return ids


_STOP_END_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stop_string_end_ids(tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]) -> frozenset[int]:
    """The ids whose decoded text contains the last character of a stop string: the only tokens that can
    complete one. Decodes the vocabulary once per tokenizer (0.6 s for a 49k vocabulary), then cached."""
    last_chars = frozenset(s[-1] for s in stop_strings if s)
    if not last_chars:
        return frozenset()
    cached = _STOP_END_IDS.setdefault(tokenizer, {})
    if last_chars not in cached:
        texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
        cached[last_chars] = frozenset(i for i, text in enumerate(texts) if any(c in text for c in last_chars))
    return cached[last_chars]


def play_episodes(
    task_ids: Sequence[str],
    groups: Sequence[int],
    make_env: Callable[[], Environment],
    policy: Policy,
    renderer: TurnRenderer,
    max_turns: int,
    first_episode_index: int = 0,
    env_workers: int = 1,
    timeouts: EnvTimeouts | None = None,
) -> tuple[list[TurnSample], list[EpisodeResult]]:
    """Play one episode per entry of `task_ids` (entry i belongs to group `groups[i]`), all batched.

    Rewards: every turn-sample of an episode gets the episode's outcome reward (the sum of the
    environment's rewards), minus `invalid_action_penalty` on a turn whose action was invalid.
    `rollout.invalid_action` says what is invalid and what reaches the environment (`judge_action`);
    an action that is not sent changes nothing and the episode goes on. An exception raised by the
    environment ends that episode as failed (`env_error`), never the batch; so does an observation whose
    text, admissible actions or reward is not what the protocol promises, and a reset or step that runs
    past its timeout (`timeouts`; None waits as long as the call takes).

    Each episode has its own environment object; `env_workers` threads reset and step them in
    parallel (engines that wait on a server or a subprocess gain; results never depend on it).
    """
    rollout = renderer.rollout
    pattern = re.compile(rollout.action_pattern, re.DOTALL)
    eos = renderer.tokenizer.eos_token_id
    episodes = [
        _EpisodeState(env=None, result=EpisodeResult(task_id, "unknown", group, first_episode_index + offset))  # type: ignore[arg-type]
        for offset, (task_id, group) in enumerate(zip(task_ids, groups))
    ]
    timeouts = timeouts or EnvTimeouts()
    with ThreadPoolExecutor(max_workers=max(1, env_workers), thread_name_prefix="sdar-env") as pool:
        _run_all(pool, lambda state: _start(state, make_env, timeouts.reset), episodes)
        samples = _play_turns(episodes, pool, policy, renderer, pattern, eos, max_turns, timeouts.step)
        _run_all(pool, _close, episodes)
    # an episode that ended without reporting a metric (cut off, or failed, even before its environment was
    # built) takes the environment's default for it, so averages count it
    defaults = next((dict(getattr(state.env, "metric_defaults", {})) for state in episodes if state.env is not None), {})
    for state in episodes:
        state.result.metrics = {**defaults, **state.result.metrics}
    return samples, [state.result for state in episodes]


def _run_all(pool: ThreadPoolExecutor, work: Callable[[_EpisodeState], None], states: Iterable[_EpisodeState]) -> None:
    """`work` on every state, in parallel; each call only touches its own episode."""
    for future in [pool.submit(work, state) for state in states]:
        future.result()


@dataclass(frozen=True)
class EnvTimeouts:
    """Seconds a reset or a step may take (None: unbounded)."""

    reset: float | None = None
    step: float | None = None


class EnvTimeout(TimeoutError):
    """An environment call ran past its timeout."""


def _bounded(call: Callable[[], object], seconds: float | None, what: str, setting: str):
    """`call()`, or EnvTimeout once it has run `seconds`. Python cannot kill a thread: the call goes on in a
    daemon thread until it returns (its result is dropped) and never keeps the process from exiting."""
    if seconds is None:
        return call()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=run, name="sdar-env-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise EnvTimeout(f"{what} took longer than {seconds:g} s ({setting}); the environment object is abandoned")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


def checked_observation(observation: Observation) -> Observation:
    """`observation` if it keeps the protocol (text a string, admissible actions a list of strings, reward a
    finite number); else TypeError or ValueError saying what is wrong, which fails its episode."""
    if not isinstance(observation.text, str):
        raise TypeError(f"observation text is a {type(observation.text).__name__}, not a string")
    actions = observation.admissible_actions
    if not isinstance(actions, list) or not all(isinstance(action, str) for action in actions):
        raise TypeError(f"admissible_actions must be a list of strings, got {actions!r:.80}")
    reward = observation.reward
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise ValueError(f"reward must be a finite number, got {reward!r:.80}")
    return observation


def _start(state: _EpisodeState, make_env: Callable[[], Environment], timeout: float | None = None) -> None:
    def reset() -> None:
        state.env = make_env()
        task, observation = state.env.reset(state.result.task_id)
        state.task, state.observation = task, checked_observation(observation)
        state.result.task_type = state.task.task_type

    try:
        _bounded(reset, timeout, f"env reset of task {state.result.task_id}", "env.reset_timeout_s")
    except Exception as err:  # noqa: BLE001 - a broken environment fails its episode, not the run
        state.hung = isinstance(err, EnvTimeout)
        _fail(state, err)


def _close(state: _EpisodeState) -> None:
    state.done = True
    if state.env is not None and not state.hung:
        try:
            state.env.close()
        except Exception:  # noqa: BLE001 - closing must not lose the episode's samples
            logger.warning("closing the environment of episode %d failed", state.result.episode)


def _play_turns(
    episodes: list[_EpisodeState],
    pool: ThreadPoolExecutor,
    policy: Policy,
    renderer: TurnRenderer,
    pattern: re.Pattern[str],
    eos: int | list[int] | None,
    max_turns: int,
    step_timeout: float | None = None,
) -> list[TurnSample]:
    rollout = renderer.rollout

    samples: list[TurnSample] = []
    episode_samples: dict[int, list[TurnSample]] = {}
    for turn in range(max_turns):
        active = [state for state in episodes if not state.done]
        if not active:
            break
        # the teacher's next_action / shuffled contexts need the expert's action: one bounded call per episode,
        # and an expert that raises or hangs fails its episode like a step would
        experts: dict[int, RecordedExpert | None] = {}
        if renderer.teacher.context in ("next_action", "shuffled"):
            for state in active:
                experts[id(state)] = _expert_now(state, step_timeout)
            active = [state for state in active if not state.done]
            if not active:
                break
        renderer.remember_contexts((s.task, s.observation.privileged, experts.get(id(s))) for s in active)
        privileged_texts = [
            renderer.privileged_context(s.task, s.observation.privileged, experts.get(id(s))) for s in active
        ]
        turn_prompts = [
            renderer.turn_prompt_ids(
                s.task, s.history, s.shown_observation(), s.observation.admissible_actions, privileged
            )
            for s, privileged in zip(active, privileged_texts)
        ]
        prompt_ids = [student for student, _ in turn_prompts]
        responses = policy(prompt_ids)
        sampler_logps = getattr(policy, "sampler_logps", None) or [None] * len(responses)
        moves = []
        for state, (prompt, teacher_prompt), privileged, response, logps in zip(
            active, turn_prompts, privileged_texts, responses, sampler_logps
        ):
            observation = state.observation
            text = rollout.response_prefix + renderer.tokenizer.decode(response, skip_special_tokens=True)
            action = parse_action(text, pattern)
            valid, sent = judge_action(
                action, observation.admissible_actions, text, rollout.invalid_action, rollout.format_requires
            )
            sample = TurnSample(
                task_id=state.result.task_id,
                task_type=state.result.task_type,
                group=state.result.group,
                episode=state.result.episode,
                turn=turn,
                prompt_ids=prompt,
                teacher_prompt_ids=teacher_prompt,
                response_ids=list(response),
                action=action,
                valid=valid,
                truncated=len(response) >= rollout.max_new_tokens and response[-1] != eos,
                privileged=privileged,
                sampler_logps=logps,
            )
            samples.append(sample)
            episode_samples.setdefault(state.result.episode, []).append(sample)
            state.result.turns += 1
            moves.append((state, action, valid, sent))
        for future in [pool.submit(_advance, *move, step_timeout) for move in moves]:
            future.result()
    penalty = rollout.invalid_action_penalty
    for state in episodes:
        for sample in episode_samples.get(state.result.episode, []):
            sample.reward = state.result.outcome_reward - (0.0 if sample.valid else penalty)
    return samples


def _expert_now(state: _EpisodeState, timeout: float | None) -> RecordedExpert | None:
    """The expert's action in the episode's current state; None (and the episode failed) when asking failed."""
    try:
        action = _bounded(state.env.expert_action, timeout, "env expert_action", "env.step_timeout_s")
        if action is not None and not isinstance(action, str):
            raise TypeError(f"expert_action() returned a {type(action).__name__}, not a string or None")
    except Exception as err:  # noqa: BLE001 - a broken environment fails its episode, not the run
        state.hung = isinstance(err, EnvTimeout)
        _fail(state, err)
        return None
    return RecordedExpert(action)


def _advance(
    state: _EpisodeState, action: str | None, valid: bool, sent: bool, timeout: float | None = None
) -> None:
    observation = state.observation
    if not valid:
        state.result.invalid_actions += 1
    if not sent:
        state.history.append((observation.text, action or "(no action)"))
        state.last_action_invalid = True
        return
    env_action = canonical_action(action, observation.admissible_actions)
    try:
        following = checked_observation(
            _bounded(lambda: state.env.step(env_action), timeout, f"env step {env_action!r}", "env.step_timeout_s")
        )
        metrics = _episode_metrics(following.metrics)
    except Exception as err:  # noqa: BLE001 - a broken environment fails its episode, not the run
        state.hung = isinstance(err, EnvTimeout)
        _fail(state, err)
        return
    state.history.append((observation.text, env_action))
    state.observation = following
    state.last_action_invalid = False
    state.result.outcome_reward += float(following.reward)
    state.result.metrics.update(metrics)  # the latest value of each metric the episode reported
    if following.done:
        state.done = True
        state.result.won = bool(following.won)


def _episode_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """An observation's metrics as finite floats; anything else is the environment's error."""
    values = {str(name): float(value) for name, value in (metrics or {}).items()}
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise ValueError(f"the environment reported a non-finite metric {bad[0]!r}")
    return values


def _fail(state: _EpisodeState, err: Exception) -> None:
    state.done = True
    state.result.won = False
    state.result.env_error = f"{type(err).__name__}: {err}"
    logger.warning("episode %d (%s) failed in the environment (counted in env_error_rate): %s",
                   state.result.episode, state.result.task_id, err)
