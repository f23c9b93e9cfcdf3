"""`train --resume` of a run with self-training rounds (training/rounds.py). Before the last round the
checkpoints live in RUN/round<k> and RUN holds none, so resume has to find the round that was interrupted:
it continues that round from its own checkpoint, starts a round that had not checkpointed yet, and ends where
the uninterrupted run ends."""

import json

import pytest
import torch

from transferkit.config import config_from_dict
from transferkit.errors import TransferkitError
from transferkit.preprocess import Preprocessing
from transferkit.runs import Labels, save_run_metadata
from transferkit.training import resume, train
from transferkit.training.rounds import finished
from transferkit.training.trainer import TrainLoop

# three rounds, so that round 2 trains in RUN/round2; 64 images of 32 px: 2 steps in round 1, 4 in the others
ROUNDS = dict(
    data=["mnist"],
    unlabeled=["digits"],
    limit=64,
    epochs=1,
    round_epochs=1,
    rounds=3,
    image_size=32,
    batch_size=32,
    device="cpu",
    teacher_ema=0.0,
    adapt_bn=False,
    checkpoint_every=2,
)


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, original, round_dir: str, global_step: int, trained: list) -> None:
    """Every step TrainLoop trains from now on is noted in `trained` as (round directory name, global step);
    the step `global_step` of the round in `round_dir` dies before it trains, as a kill would."""

    def train_step(self, *batch):
        if self.run_dir.name == round_dir and self.global_step == global_step:
            raise _Killed
        trained.append((self.run_dir.name, self.global_step))
        return original(self, *batch)

    monkeypatch.setattr(TrainLoop, "train_step", train_step)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_an_interrupted_round_continues_from_its_own_checkpoint(tmp_path, monkeypatch, capsys):
    reference = train(config_from_dict({**ROUNDS, "out": str(tmp_path / "ref")}))
    original, run, trained = TrainLoop.train_step, tmp_path / "run", []

    # killed during round 2, after its checkpoint at step 2: only RUN/round2 holds a checkpoint
    _kill_at(monkeypatch, original, "round2", 3, trained)
    with pytest.raises(_Killed):
        train(config_from_dict({**ROUNDS, "out": str(run)}))
    state = torch.load(run / "round2" / "checkpoint.pt", weights_only=True)
    assert (state["global_step"], state["finished"]) == (2, False)
    assert finished(run / "round1") and not (run / "checkpoint.pt").exists()

    # resumed, and killed again at round 3's first step, before round 3 wrote any checkpoint
    trained.clear()
    _kill_at(monkeypatch, original, run.name, 0, trained)
    with pytest.raises(_Killed):
        resume(run)
    # round 1 is not trained again, and round 2 goes on from its step 2, not from its first step
    assert trained == [("round2", 2), ("round2", 3)]
    assert f"resume: {run / 'round2'} at epoch 1, step 2/4" in capsys.readouterr().err
    assert finished(run / "round2") and not (run / "checkpoint.pt").exists()
    assert (run / "pseudo_labels.json").is_file()  # round 3's labels, written before it was killed

    # resumed again: round 3 starts from round 2's model and labels, and the run ends as the uninterrupted one
    trained.clear()
    monkeypatch.setattr(TrainLoop, "train_step", original)
    assert resume(run) == run
    assert finished(run) and (run / "model.pt").is_file()
    summary = json.loads((run / "rounds.json").read_text())["rounds"]
    expected = json.loads((reference / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in summary] == [1, 2, 3]
    for got, want in zip(summary, expected):
        assert {k: v for k, v in got.items() if k != "dir"} == {k: v for k, v in want.items() if k != "dir"}
    assert _same_weights(run / "round2" / "model.pt", reference / "round2" / "model.pt")
    assert _same_weights(run / "model.pt", reference / "model.pt")


def test_a_run_without_rounds_needs_a_checkpoint_to_resume(tmp_path):
    config = config_from_dict({**ROUNDS, "unlabeled": [], "rounds": 1, "out": str(tmp_path)})
    save_run_metadata(tmp_path, config, Preprocessing(image_size=32), Labels({"mnist": list("0123456789")}, {}))
    with pytest.raises(TransferkitError, match="no checkpoint.pt to resume from"):
        resume(tmp_path)
