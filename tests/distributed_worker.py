"""One training step on a fixed rollout batch, in one process or as one rank under torchrun.

    python tests/distributed_worker.py MODEL_DIR RUN_ROOT OUT_JSON [--set KEY=VALUE ...]

test_distributed.py runs it plainly and with `python -m torch.distributed.run --nproc_per_node 2` and
compares the loss and the LoRA gradient. The batch depends only on the task ids and the global episode
ids (never on the rank or its random state): each task's episodes last 1 to 3 turns, so the two ranks
hold different numbers of turn-samples. The main process writes OUT_JSON: the logged loss, the LoRA
gradient of the update (after the processes averaged theirs) and the episodes each rank played.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import build_trainer, tiny_config  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from sdar_cli import distributed  # noqa: E402
from sdar_cli.rollout import EpisodeResult, TurnSample  # noqa: E402
from sdar_cli.trainer import SDARTrainer  # noqa: E402


def fixed_episode(task_id: str, group: int, episode: int, vocab: int) -> tuple[list[TurnSample], EpisodeResult]:
    number = int(task_id.split("-")[1])
    turns = number % 3 + 1
    won = episode % 2 == 0
    reward = 10.0 if won else 0.0
    samples = []
    for turn in range(turns):
        generator = torch.Generator().manual_seed(1000 * episode + turn)
        prompt = torch.randint(3, vocab, (6 + turn,), generator=generator).tolist()
        privileged = torch.randint(3, vocab, (4,), generator=generator).tolist()
        response = torch.randint(3, vocab, (2 + (episode + turn) % 5,), generator=generator).tolist()
        samples.append(
            TurnSample(
                task_id, "fixed", group, episode, turn, prompt, privileged + prompt, response,
                action="a", valid=True, truncated=False, privileged="", reward=reward,
            )
        )
    return samples, EpisodeResult(task_id, "fixed", group, episode, turns, won, reward)


class FixedBatchTrainer(SDARTrainer):
    def _play_episodes(self, model, task_ids, groups):
        samples, episodes = [], []
        for offset, (task_id, group) in enumerate(zip(task_ids, groups)):
            turn_samples, result = fixed_episode(task_id, group, self._first_episode + offset, model.config.vocab_size)
            samples += turn_samples
            episodes.append(result)
        self.played = [(e.task_id, e.episode, e.turns) for e in episodes]
        return samples, episodes


class Capture(TrainerCallback):
    def __init__(self):
        self.gradient = {}
        self.loss = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradient = {
            name: parameter.grad.detach().double().flatten().tolist()
            for name, parameter in self.trainer.model.named_parameters()
            if parameter.requires_grad
        }

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = logs["loss"]


def main() -> None:
    model_dir, run_root, out_path, *rest = sys.argv[1:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
    run_dir = Path(run_root) / f"world-{distributed.world_size()}"
    config = tiny_config(Path(model_dir), run_dir, "train.max_steps=1", "train.save_steps=100", *overrides)
    capture = Capture()
    trainer, _ = build_trainer(config, run_dir, callbacks=[capture], trainer_class=FixedBatchTrainer)
    capture.trainer = trainer
    trainer.train()
    played = distributed.gather_to_main(trainer.played)
    nonfinite = distributed.gather_to_main(nonfinite_on_main_only(model_dir, run_root, overrides))
    if distributed.is_main():
        Path(out_path).write_text(
            json.dumps({"loss": capture.loss, "gradient": capture.gradient, "played": played, "nonfinite": nonfinite})
        )


def nonfinite_on_main_only(model_dir: str, run_root: str, overrides: list[str]) -> dict:
    """A step whose loss is NaN on the main process only: does this process skip its update too?"""
    import sdar_cli.losses as losses_module

    run_dir = Path(run_root) / f"nonfinite-world-{distributed.world_size()}"
    config = tiny_config(Path(model_dir), run_dir, "train.max_steps=1", "train.save_steps=100", *overrides)
    trainer, _ = build_trainer(config, run_dir, trainer_class=FixedBatchTrainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    original = losses_module.sdar_token_loss
    if distributed.is_main():
        losses_module.sdar_token_loss = lambda teacher, student, gate: student * float("nan")
    try:
        trainer.train()
    finally:
        losses_module.sdar_token_loss = original
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    return {"weights_unchanged": unchanged, "nonfinite_total": trainer.nonfinite_total}


if __name__ == "__main__":
    main()
