"""The training loop: `train(config)` -> run directory; `resume(run_dir)` continues an interrupted run.

One optimiser step = one global batch from the multi-dataset sampler (+ unlabeled images when
pseudo-labelling), split into `grad_accum` micro-batches and, under torchrun, across processes.
Validation every epoch; the best epoch's weights (EMA weights when EMA is on) become model.pt.
"""

from __future__ import annotations

import copy
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from transferkit.config import TrainConfig
from transferkit.data import DatasetSpec
from transferkit.errors import TransferkitError
from transferkit.runs import load_run, save_run_metadata
from transferkit.tracking import open_tracker
from transferkit.training import distill, fit_check, precise_bn
from transferkit.training import rounds as self_training
from transferkit.training.adaptation import PseudoLabeller
from transferkit.training.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
    save_weights,
)
from transferkit.training.distributed import DistInfo, barrier, broadcast_flag, init_distributed, shutdown
from transferkit.training.evaluate import accuracy, predict_logits
from transferkit.training.metrics_log import MetricsLog, progress_bar
from transferkit.training.optim import EMA, set_backbone_frozen
from transferkit.training.sampling import shard
from transferkit.training.setup import TrainingSetup, build_optimizer, build_setup
from transferkit.training.steps import DistillationStep, MicroBatch, StepContext, SupervisedStep, TrainingStep
from transferkit.training.traffic_snapshot import snapshot_traffic
from transferkit.training.transfer import describe_mapping, init_from_run
from transferkit.utils import atomic_write_json


def default_run_dir(config: TrainConfig) -> Path:
    names = "+".join(DatasetSpec.parse(s, with_head=False).name for s in config.data)
    return Path("runs") / f"{names}-{datetime.now():%Y%m%d-%H%M%S}"


def train(config: TrainConfig) -> Path:
    """Train from scratch (or from --init) into a new run directory; returns it."""
    config.validate()
    run_dir = Path(config.out) if config.out else default_run_dir(config)
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "model.pt").exists() or self_training.has_rounds(run_dir):
        raise TransferkitError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out"
        )
    config.out = str(run_dir)
    _absolute_paths(config)
    snapshot_traffic(config, run_dir)  # captured traffic keeps changing; the run trains on what it saw now
    return _run(config, run_dir, resuming=False)


def _absolute_paths(config: TrainConfig) -> None:
    """Paths in the saved config must still work when eval/export run from another directory."""
    config.data = [str(DatasetSpec.parse(s, with_head=False).resolved()) for s in config.data]
    config.unlabeled = [str(DatasetSpec.parse(s).resolved()) for s in config.unlabeled]
    from transferkit.backbones import is_weights_file

    if is_weights_file(config.weights):
        config.weights = str(Path(config.weights).expanduser().resolve())
    for key in ("label_map", "init"):
        if getattr(config, key):
            setattr(config, key, str(Path(getattr(config, key)).expanduser().resolve()))
    config.teachers = [str(Path(t).expanduser().resolve()) for t in config.teachers]


def resume(run_dir: str | Path) -> Path:
    """Continue the run in `run_dir` from its last checkpoint, with its own resolved config. A run with rounds
    keeps its checkpoints in the round being trained (RUN/round<k> before the last round), so RUN itself may
    have none: `run_rounds` skips the finished rounds and continues the first unfinished one from its own
    checkpoint, or starts it when it had not written one yet."""
    run = load_run(run_dir)
    if self_training.effective_rounds(run.config) == 1 and not (run.dir / CHECKPOINT_NAME).is_file():
        raise TransferkitError(f"{run.dir} has no checkpoint.pt to resume from; start it again with train")
    run.config.validate()  # e.g. an --init run or image folder that has gone since
    return _run(run.config, run.dir, resuming=True)


def _run(config: TrainConfig, run_dir: Path, resuming: bool) -> Path:
    dist_info, device = init_distributed(config.device)
    try:
        if self_training.effective_rounds(config) > 1:  # self-training: one TrainLoop per round (training/rounds.py)
            make = lambda d, again, cfg, start: TrainLoop(cfg, d, dist_info, device, again, start)  # noqa: E731
            return self_training.run_rounds(config, run_dir, make, dist_info, device)
        return TrainLoop(config, run_dir, dist_info, device, resuming).run()
    finally:
        shutdown(dist_info)


class TrainLoop:
    """One training run's state and steps. `run()` trains to the end; `train_step(batch)` is one optimiser
    step (used as-is by benchmarks/train_throughput.py, so the benchmark measures the real loop)."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        dist: DistInfo,
        device: torch.device,
        resuming: bool,
        start: self_training.RoundStart | None = None,
    ):
        self.cfg, self.run_dir, self.dist, self.device = config, run_dir, dist, device
        # distillation: teachers are checked and loaded before any data, and before the seed is set
        teachers = distill.load_teachers(config, device) if config.teachers else None
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.setup: TrainingSetup = build_setup(config, device)
        self.model = self.setup.model
        self.log = self._print if dist.is_main else (lambda *a: None)
        for name, head in self.setup.unlabeled_heads.items():
            self.log(f"unlabeled: {name} is pseudo-labelled by head {head}")
        for line in distill.describe_teachers(teachers or [], config.image_size):
            self.log(line)
        init, self.round_record = config.init, {}
        if start is not None:  # a later round: the previous round's labels join the data, its model starts this one
            self.setup = self_training.with_labels(self.setup, start.labels)  # before the schedule is built
            self.log(start.describe())
            init, self.round_record = str(start.previous), start.record
        if init and not resuming:
            mapping = init_from_run(self.model, init, self.setup.label_map)
            for line in describe_mapping(mapping):
                self.log(line)
            if dist.is_main:
                atomic_write_json(run_dir / "transfer.json", mapping)
        self.optimizer, self.scheduler = build_optimizer(self.setup)
        self.ema = EMA(self.model, config.ema) if config.ema else None
        self.eval_model = copy.deepcopy(self.model) if config.ema else self.model
        # who labels the weak view: a mean teacher and/or target BatchNorm statistics (training/adaptation.py)
        self.labeller = PseudoLabeller.for_run(config, self.model, self.setup.preprocessing)
        # On the training device: random numbers drawn on the CPU would need a host-to-device copy per step,
        # and a copy from pageable memory waits for the GPU to drain, stalling the launch pipeline.
        self.aug_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
        # what one micro-batch computes (training/steps.py), and what it reads besides the model and the batch
        self.stepper: TrainingStep = (
            DistillationStep(teachers) if teachers else SupervisedStep(self.labeller, self.model)
        )
        self.context = StepContext.of(self.setup, self.aug_gen)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best, self.bad_epochs, self.finished = -1.0, 0, False
        self.totals: dict = {}
        # one tracked run per run folder (tracking/): created here, continued by a resume, eval and export
        self.tracker = open_tracker(config.track if dist.is_main else None, run_dir, "distill" if teachers else "train")
        self.metrics = MetricsLog(
            run_dir, tensorboard=config.tensorboard and dist.is_main, tracker=self.tracker if config.track else None
        )
        if resuming:
            self._restore()
        elif dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            recorded = start.run_config if start is not None else config
            save_run_metadata(run_dir, recorded, self.setup.preprocessing, self.setup.plan.labels)
            atomic_write_json(run_dir / "weights.json", self.setup.weights)  # what the backbone started from
            self.tracker.log_params(config.to_dict())
            self.tracker.set_tags({"transferkit.backbone": config.backbone, **_weights_tags(self.setup.weights)})
        self.train_model = self._wrap()

    @staticmethod
    def _print(*args) -> None:
        print(*args, file=sys.stderr, flush=True)

    # ---- state ----
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "alignment": self.setup.alignment.state_dict() if self.setup.alignment else None,
            "labeller": self.labeller.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "finished": self.finished,
            "history": self.metrics.history,
            "epoch_totals": {k: float(v) for k, v in self.totals.items()},  # the epoch's sums so far
            "rng": rng_state(self.aug_gen),
        }

    def _checkpoint(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run_dir, self._state())

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.setup.alignment and state.get("alignment"):
            self.setup.alignment.load_state_dict(state["alignment"])
        self.labeller.load_state_dict(state.get("labeller"))
        for key in ("epoch", "step", "global_step", "best", "bad_epochs", "finished"):
            setattr(self, key, state[key])
        self.metrics.history = list(state["history"])
        self.totals = dict(state["epoch_totals"])
        restore_rng(state["rng"], self.aug_gen)
        self.log(f"resume: {self.run_dir} at epoch {self.epoch + 1}, step {self.step}/{self.setup.steps_per_epoch}")

    def _frozen(self) -> bool:
        return self.epoch < self.cfg.freeze_epochs

    def _wrap(self):
        """(Re)wrap for DDP whenever the set of trainable parameters changes (freeze stages)."""
        set_backbone_frozen(self.model, self._frozen())
        model = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.compile:
            model = torch.compile(model)
        return model

    # ---- loop ----
    def run(self) -> Path:
        try:
            return self._run()
        except BaseException:
            self.tracker.finish(failed=True)  # the tracked run says it failed rather than running forever
            raise

    def _run(self) -> Path:
        cfg = self.cfg
        trained_here = not self.finished
        if self.finished:
            self.log(f"{self.run_dir} already finished; nothing to resume")
        while self.epoch < cfg.epochs and not self.finished:
            was_frozen = self._frozen()
            self._train_epoch()
            self._end_epoch()
            if was_frozen != self._frozen() and not self.finished:
                self.log(f"epoch {self.epoch}: unfreezing the backbone")
                self.train_model = self._wrap()
        if trained_here and self.metrics.history:  # an early stop ends training too
            self._report_fit()
        self.finished = True
        self._checkpoint()
        self.metrics.close()
        for name in ("config.yaml", "labels.json", "preprocessing.json", "weights.json", "metrics.json", "metrics.csv"):
            self.tracker.log_artifact(self.run_dir / name, "run")
        self.tracker.finish()
        barrier(self.dist)
        return self.run_dir

    def _train_epoch(self) -> None:
        cfg, setup = self.cfg, self.setup
        self.model.train()
        set_backbone_frozen(self.model, self._frozen())
        n_steps = setup.steps_per_epoch
        bar = progress_bar(
            total=n_steps,
            initial=self.step,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not self.dist.is_main,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        # epoch sums as device tensors: reading them forces a sync, so only every `sync_every` steps
        sync_every = 25
        if self.step == 0:
            self.totals = {}
        images = 0
        start = time.perf_counter()
        tracked: list[tuple[int, dict]] = []  # per-step values for the tracker, read at the sync points
        for labelled, unlabeled in self.step_inputs(self.epoch, self.step):
            stats = self.train_step(labelled, unlabeled)
            self.totals = {k: self.totals.get(k, 0) + v for k, v in stats.items()}
            images += int(stats["images"])
            self.step += 1
            self.global_step += 1
            bar.update(1)
            if self.metrics.tracker is not None:
                lr = self.optimizer.param_groups[-1]["lr"]
                tracked.append((self.global_step, {"loss": stats["loss"], "lr": lr}))
            if self.dist.is_main and (self.step % sync_every == 0 or self.step == n_steps):
                self.metrics.steps(tracked)
                tracked = []
                rate = images / max(time.perf_counter() - start, 1e-9)
                seen = max(int(self.totals["seen"]), 1)
                bar.set_postfix(
                    loss=f"{float(stats['loss']):.3f}",
                    acc=f"{int(self.totals['correct']) / seen:.3f}",
                    img_s=f"{rate:.0f}",
                )
            if self.global_step % cfg.checkpoint_every == 0 and self.step < n_steps:
                self._checkpoint()
        totals = {k: float(v) for k, v in self.totals.items()}
        bar.close()
        elapsed = time.perf_counter() - start
        steps_run = max(totals.get("steps", 0.0), 1.0)
        self._epoch_train = {
            "train_loss": totals.get("loss", 0.0) / steps_run,
            "train_acc": totals.get("correct", 0.0) / max(totals.get("seen", 0.0), 1.0),
            "images_per_s": images / max(elapsed, 1e-9),
            "lr": self.optimizer.param_groups[-1]["lr"],
        }
        if "kd" in totals:  # distillation: the KD part of the loss, before kd_weight
            self._epoch_train["kd_loss"] = totals["kd"] / steps_run
        if totals.get("unl", 0) > 0:  # pseudo-labels were in use this epoch
            self._epoch_train["pseudo_coverage"] = totals["kept"] / max(totals["unl"], 1.0)
            self._epoch_train["pseudo_accuracy"] = totals["kept_right"] / max(totals["kept"], 1.0)

    def step_inputs(self, epoch: int, start: int):
        """This process's (labelled, unlabeled-or-None) batches for the steps of `epoch` from `start` on: every
        process draws the same global batch and takes its own shard of it."""
        setup, rank, world = self.setup, self.dist.rank, self.dist.world_size
        batches = setup.sampler.epoch_batches(epoch)[start:]
        labelled = setup.pool.iterate([shard(b, rank, world) for b in batches])
        if setup.unlabeled is None:
            return ((lab, None) for lab in labelled)
        unl = [shard(setup.unlabeled_sampler.batch(epoch, start + k), rank, world) for k in range(len(batches))]
        return zip(labelled, setup.unlabeled.iterate(unl))

    def train_step(self, labelled, unlabeled=None) -> dict:
        """One optimiser step on this process's batch (images, labels, head ids) -> stats as device tensors."""
        cfg = self.cfg
        n = len(labelled[0])
        micro = list(zip(*(t.tensor_split(cfg.grad_accum) for t in labelled)))
        unl_micro = [None] * cfg.grad_accum
        if unlabeled is not None:
            unl_micro = list(zip(*(t.tensor_split(cfg.grad_accum) for t in unlabeled)))
        self.optimizer.zero_grad(set_to_none=True)
        out: dict = {"steps": 1}
        ctx = self.context.at(self.global_step)
        for part, unl_part in zip(micro, unl_micro):
            stats = self.stepper.forward_backward(self.train_model, MicroBatch(part, unl_part, n), ctx)
            for k, v in stats.items():
                out[k] = out.get(k, 0) + v
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema:
            self.ema.update(self.model)
        self.labeller.update(self.model)
        return out

    # ---- epoch end ----
    def _end_epoch(self) -> None:
        cfg = self.cfg
        if self.ema:
            self.eval_model.load_state_dict(self.ema.state_dict())
        bn_images = self._precise_bn()
        val = self.validate(self.eval_model)
        mean_val = float(np.mean(list(val.values())))
        self.epoch, self.step = self.epoch + 1, 0
        record = {
            "epoch": self.epoch,
            **self._epoch_train,
            "val_acc": val,
            "val_acc_mean": mean_val,
            **self.round_record,
        }
        if bn_images:
            record["precise_bn_images"] = bn_images
        improved = mean_val > self.best
        if improved:
            self.best, self.bad_epochs = mean_val, 0
            record["best"] = True
            if self.dist.is_main:
                save_weights(self.run_dir / "model.pt", self.eval_model.state_dict())
        else:
            self.bad_epochs += 1
        if self.dist.is_main:
            self.metrics.add(record)
        stop = cfg.early_stop is not None and self.bad_epochs >= cfg.early_stop
        self.finished = broadcast_flag(self.dist, stop)
        pseudo = ""
        if "pseudo_coverage" in record:
            pseudo = f"  pseudo-labels: {record['pseudo_coverage']:.1%} kept, {record['pseudo_accuracy']:.1%} right"
        vals = "  ".join(f"{k} {v:.4f}" for k, v in val.items())
        self.log(
            f"epoch {self.epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  train acc {record['train_acc']:.4f}  "
            f"val {vals}  {record['images_per_s']:.0f} img/s{'  *best*' if improved else ''}{pseudo}"
        )
        if self.finished:
            self.log(f"early stop: no better validation accuracy for {cfg.early_stop} epochs")
        self._checkpoint()

    def _precise_bn(self) -> int:
        """The evaluated model's BatchNorm statistics recomputed over training images (training/precise_bn.py)
        -> images used; none while the backbone is frozen, whose statistics the heads were trained under."""
        if self._frozen():
            return 0
        return precise_bn.recompute(self.eval_model, self.setup, self.epoch, self.cfg.precise_bn)

    def _report_fit(self) -> None:
        """The best epoch in one line and, when validation is far below training accuracy, why it may be."""
        best = max(self.metrics.history, key=lambda r: r["val_acc_mean"])
        steps, batch = self.global_step, self.cfg.batch_size
        self.log(fit_check.summary(best, steps, batch))
        warning = fit_check.gap_warning(best, steps, batch, fit_check.fewest_per_class(self.setup))
        if warning:
            self.log(f"transferkit: {warning}")

    def validate(self, model) -> dict[str, float]:
        """Validation accuracy of each dataset on its own head."""
        setup, out = self.setup, {}
        for ds in setup.datasets:
            head = setup.plan.labels.datasets[ds.name]
            remap = np.asarray(setup.plan.label_remap[ds.name])
            logits = predict_logits(model, ds.val.images, setup.preprocessing, self.device, heads=[head])
            out[ds.name] = accuracy(logits[head], remap[ds.val.labels])
        return out


def _weights_tags(weights: dict) -> dict[str, str]:
    """The backbone's starting weights as tags: where they came from and, for a file, its sha256."""
    keys = ("source", "name", "path", "sha256", "matched")
    return {f"transferkit.weights.{k}": str(weights[k]) for k in keys if weights.get(k)}
