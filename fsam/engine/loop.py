"""The training loop: build everything from a checked config, train, evaluate, record, checkpoint, resume.

    from fsam.engine import run
    summary = run({"run_dir": "runs/try", "dataset": {"name": "digits"}, "trainer": {"epochs": 2}})

The loop never branches on the method: ``fsam.optim.train_step`` does one pass for SGD and two for the SAM
family. Starting a run whose folder holds a checkpoint continues it exactly (model, optimizer and EMA, schedule,
loss scaler, random state and the position inside the epoch), but only under the setting and seed it was written
with (:func:`fsam.runfolder.run_key`); a folder with ``summary.json`` is finished and is skipped. One process (or
one DDP group) holds a run folder at a time (:class:`fsam.runfolder.RunLock`).
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fsam.cluster import threads_from_slurm
from fsam.config import RunConfig, load_config, to_plain
from fsam.data import AugmentSpec, NoiseSpec, build_data
from fsam.engine import distributed
from fsam.engine.checkpoint import CheckpointStore, capture_rng, restore_rng
from fsam.engine.evaluate import evaluate, topk_correct, training_fit
from fsam.engine.preemption import Interrupted, StopSignals, signal_name
from fsam.engine.schedule import create_schedule
from fsam.engine.wandb_mirror import WandbMirror, new_run_id
from fsam.errors import CheckpointError, DataError, DivergedError, FsamError
from fsam.models import check_forward, create_model
from fsam.optim import FSAM, SAM, Precision, agreement, create_optimizer, full_gradient, train_step
from fsam.runfolder import (
    RunFolder, RunFolderError, command_line, default_run_dir, differences, git_commit, identity_record, model_kwargs,
    model_label, now_iso, package_versions, run_key,
)

CHECKPOINT_FORMAT = 1
MAX_LISTED_DIFFERENCES = 8
# Per-step wandb points (train/loss, train/lr) a run has at least, one per step in a shorter run: trainer.log_every
# is the longest interval between them, so a short run still has a curve, not only its epoch points.
STEP_POINTS = 100


@dataclass
class Progress:
    """Where the run stands; everything here goes into a checkpoint."""

    epoch: int = 0  # index of the epoch in progress (0-based); equals epochs when training is done
    batch: int = 0  # next batch of that epoch
    global_step: int = 0
    best_top1: float | None = None
    best_epoch: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0  # over all launches, up to the last checkpoint
    wandb_id: str = field(default_factory=new_run_id)
    analysis: list[dict[str, Any]] = field(default_factory=list)  # the epoch's EMA-vs-full-gradient measurements


@dataclass
class EpochTotals:
    """Training sums of the epoch in progress, kept on the device (no host sync per step)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor
    skipped: torch.Tensor
    train_time_s: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochTotals":
        def zero(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        return cls(zero(torch.float32), zero(torch.int64), zero(torch.int64), zero(torch.int64))

    def to_plain(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "count": self.count.item(),
                "skipped": self.skipped.item(), "train_time_s": self.train_time_s}

    @classmethod
    def from_plain(cls, saved: dict[str, Any], device: torch.device) -> "EpochTotals":
        totals = cls.zeros(device)
        totals.loss_sum.fill_(saved["loss_sum"])
        totals.correct.fill_(saved["correct"])
        totals.count.fill_(saved["count"])
        totals.skipped.fill_(saved["skipped"])
        totals.train_time_s = saved["train_time_s"]
        return totals


def run(config: Mapping[str, Any] | RunConfig) -> dict[str, Any]:
    """Train one run to the end (or continue it) and return its summary (or the record that made it skip).

    Without ``run_dir`` the run goes to ``$FSAM_RUNS/<setting>/seed<seed>`` (:func:`fsam.runfolder.default_run_dir`),
    the folder ``train.py`` picks for the same config. Raises :class:`fsam.errors.FsamError` subclasses for problems
    a user can fix: a bad config value (ConfigError), missing data (DataError), an unreadable checkpoint or one of
    another setting (CheckpointError), a folder held by another process, deleted mid-run or unwritable
    (RunFolderError), a NaN or infinite loss now or in an earlier launch (DivergedError; the last good checkpoint
    stays).
    """
    config = load_config(config)
    threads_from_slurm()  # a job's CPUs, not the node's cores
    with StopSignals() as stops:
        info = distributed.setup(config.trainer.device)
        try:
            if config.run_dir is None:
                config = dataclasses.replace(config, run_dir=str(default_run_dir(config, info.world_size)))
            folder = RunFolder(config.run_dir)
            _hold(folder, info)
            try:
                return _start(config, folder, info, stops)
            finally:
                folder.release()
        finally:
            distributed.teardown()


def _hold(folder: RunFolder, info: distributed.DistInfo) -> None:
    """Rank 0 takes the folder's lock for the whole group; every process learns whether it got it."""
    refusal = None
    if info.is_main:
        try:
            folder.hold()
        except RunFolderError as error:
            refusal = error
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise refusal  # its type too: a sweep reports a folder in use (RunHeldError) as refused, not failed


def _start(
    config: RunConfig, folder: RunFolder, info: distributed.DistInfo, stops: StopSignals
) -> dict[str, Any]:
    recorded, identity = folder.read_config()
    if recorded is not None:
        processes = (identity or {}).get("processes", 1)
        try:
            before = run_key(recorded, processes)
        except FsamError:
            raise RunFolderError(
                f"{folder.config} is not a config this version can read: use another run_dir, or delete "
                f"{folder.path} to start over"
            ) from None
        refuse_other_run(folder.path, before, run_key(config, info.world_size))
    finished = folder.finished_summary()
    if finished is not None:
        if info.is_main:
            hint = (f"; to send its records to wandb: python scripts/wandb_backfill.py {folder.path}"
                    if config.logger.backend == "wandb" else "")
            print(f"skipped: {folder.path} is finished (summary.json exists); delete the folder to train it "
                  f"again{hint}")
        return finished
    stopped = folder.stopped_status()
    if stopped is not None:
        raise DivergedError(
            f"{folder.path} diverged in an earlier launch ({stopped.get('message', 'see status.json')}); it is not "
            "trained again: a changed setting gets its own folder, or delete this one to retry"
        )
    return _Trainer(config, folder, info, stops).train()


def run_data(config: RunConfig, device: torch.device, *, rank: int = 0, world_size: int = 1,
             label_noise: bool = True) -> Any:
    """The run's :class:`fsam.data.DataBundle` for this process (``rank`` of ``world_size``), as training builds
    it; the sharpness measurement (:mod:`fsam.analysis.record`) builds its images with it too. ``label_noise=False``
    gives the same images, in the same order, with their true labels (the noise changes labels only)."""
    dataset, trainer = config.dataset, config.trainer
    noise = to_plain(dataset.noise if label_noise else NoiseSpec())
    if noise["seed"] is None:  # the release's way: each training seed draws its own noisy labels
        noise["seed"] = trainer.seed
    return build_data(
        dataset.name, dataset.root, batch_size=trainer.batch_size, eval_batch_size=trainer.eval_batch_size,
        device=device, seed=trainer.seed, download=dataset.download, url=dataset.url, md5=dataset.md5,
        augment=AugmentSpec(**to_plain(dataset.augment)), noise=NoiseSpec(**noise),
        image_size=dataset.image_size, num_workers=dataset.num_workers, rank=rank,
        world_size=world_size, channels_last=trainer.channels_last, train_subset=dataset.train_subset,
        val_split=dataset.val_split, val_seed=dataset.val_seed, drop_last=dataset.drop_last,
    )


def run_model(config: RunConfig, data: Any, device: torch.device, *, pretrained_weights: bool = True) -> nn.Module:
    """The run's network for ``data`` (a :class:`fsam.data.DataBundle`) on ``device``, as training builds it.
    ``pretrained_weights=False`` builds the same architecture without reading the pretrained weights the config
    names, for a caller that loads a checkpoint over them."""
    spec = config.model
    kwargs = dict(spec.kwargs)
    asked = kwargs.pop("num_classes", data.num_classes)
    if asked != data.num_classes:
        raise DataError(
            f"model.kwargs.num_classes={asked} does not fit dataset {config.dataset.name}, which has "
            f"{data.num_classes} classes: remove model.kwargs.num_classes (the head is sized from the data)"
        )
    model = create_model(
        spec.name, data.num_classes, image_size=data.image_size,
        pretrained_path=spec.pretrained_path if pretrained_weights else None,
        pretrained=spec.pretrained and pretrained_weights, **kwargs,
    ).to(device)
    if config.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    check_forward(model, data.image_size, dict(spec.kwargs))  # a kwarg that fails only in forward
    return model


def refuse_other_run(where: Any, before: dict[str, Any], now: dict[str, Any]) -> None:
    """CheckpointError listing the keys (old -> new) when ``where`` holds a run of another setting or seed."""
    changed = differences(before, now)
    if not changed:
        return
    listed = "; ".join(changed[:MAX_LISTED_DIFFERENCES])
    if len(changed) > MAX_LISTED_DIFFERENCES:
        listed += f"; and {len(changed) - MAX_LISTED_DIFFERENCES} more"
    raise CheckpointError(
        f"{where} holds a run of another setting ({listed}): a changed setting is a new run, so leave run_dir out "
        f"(each setting gets its own folder) or delete {where} to start over"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all CUDA devices too


def precision_mode(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The mode that runs on ``device`` and, when it differs from the request, a one-line note why."""
    if requested == "bf16" and device.type == "cpu":
        return "off", "note: trainer.amp=bf16 runs as off (float32) on the CPU, where bf16 autocast is slower"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        return "off", f"note: {name} has no bf16: running float32 (or set trainer.amp=fp16)"
    return requested, None


class _Trainer:
    def __init__(
        self, config: RunConfig, folder: RunFolder, info: distributed.DistInfo, stops: StopSignals | None = None
    ) -> None:
        self.config = config
        self.folder = folder
        self.info = info
        self.stops = stops or StopSignals()
        self.device = info.device
        self.store = CheckpointStore(folder.checkpoints)
        self.launched_at = time.perf_counter()
        trainer = config.trainer

        seed_everything(trainer.seed)
        self.amp, note = precision_mode(trainer.amp, self.device)
        if note:
            self.say(note)
        self.data = run_data(config, self.device, rank=info.rank, world_size=info.world_size)
        self.model = run_model(config, self.data, self.device)
        opt = config.optimizer
        self.optimizer = create_optimizer(
            self.model, opt.name, base=opt.base, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
            weight_decay=opt.weight_decay, betas=opt.betas, rho=opt.rho, sigma=opt.sigma, lmbda=opt.lmbda,
            eta=opt.eta, ema_order=opt.ema_order, perturbation=opt.perturbation,
            no_decay_norm_and_bias=opt.no_decay_norm_and_bias,
        )
        # Steps between exact full-batch gradients: for SAM's analysis directions, and for measuring F-SAM's EMA.
        self.full_grad_every = opt.full_grad_every if opt.perturbation != "minibatch" else 0
        self.analysis_every = trainer.full_grad_analysis_every if isinstance(self.optimizer, FSAM) else 0
        if trainer.full_grad_analysis_every and not self.analysis_every:
            self.say(f"note: trainer.full_grad_analysis_every measures F-SAM's EMA; {opt.name} has none, so nothing "
                     "is measured")
        self.steps_per_epoch = len(self.data.train)
        self.wandb_every = max(1, min(trainer.log_every, self.steps_per_epoch * trainer.epochs // STEP_POINTS))
        self.schedule = create_schedule(
            self.optimizer, config.schedule, lr=opt.lr, steps_per_epoch=self.steps_per_epoch, epochs=trainer.epochs
        )
        self.precision = Precision(self.amp, self.device)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
        self.train_model = distributed.wrap(self.model, info)
        if trainer.compile:
            self.train_model = torch.compile(self.train_model)
        self.progress = Progress()
        self.totals = EpochTotals.zeros(self.device)
        self.resumed = self._resume()
        # the epoch's loss sum and count at the last per-step wandb point
        self._logged_totals = (self.totals.loss_sum.item(), self.totals.count.item())
        self.identity = identity_record(config, info.world_size, self._model_record())
        self.mirror = WandbMirror(
            config.logger, str(folder.path), self.progress.wandb_id, group=self.identity["setting"],
            name=f"{self.identity['setting']}-seed{trainer.seed}",
        )

    def _model_record(self) -> dict[str, Any]:
        """The network as built, so a small PyramidNet is never mistaken for PyramidNet-110."""
        spec = self.config.model
        kwargs = model_kwargs(spec.name, spec.kwargs)
        parameters = sum(parameter.numel() for parameter in self.model.parameters())
        return {
            "name": spec.name, "kwargs": kwargs, "parameters": parameters,
            "label": f"{model_label(spec.name, kwargs)} ({parameters / 1e6:.3g}M parameters)",
        }

    def say(self, message: str) -> None:
        if self.info.is_main:
            print(message, flush=True)

    # ----------------------------------------------------------------------------------------- checkpoints

    def _state(self, epoch_totals: dict[str, Any], replicas: list[dict[str, Any]] | None) -> dict[str, Any]:
        progress = self.progress
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "precision": self.precision.state_dict(),
            "epoch": progress.epoch,
            "batch": progress.batch,
            "global_step": progress.global_step,
            "epoch_totals": epoch_totals,
            "replicas": replicas,
            "best_top1": progress.best_top1,
            "best_epoch": progress.best_epoch,
            "metrics": progress.metrics,
            "wall_time_s": progress.wall_time_s + self._elapsed(),
            "rng": capture_rng(),
            "wandb_id": progress.wandb_id,
            "analysis": progress.analysis,
            "config": to_plain(self.config),
            "processes": self.info.world_size,
        }

    def _elapsed(self) -> float:
        return time.perf_counter() - self.launched_at

    def _save(self, *, best: bool = False) -> None:
        """Called by every process at the same step, written by one.

        Under DDP the checkpoint also holds what differs between processes (``replicas``, one entry per rank):
        each one's partial epoch sums and, when the clean pass is per replica, its own F-SAM EMA. Resuming with
        the same number of processes gives each its own back, so the run continues bit for bit; the summed
        ``epoch_totals`` serve a resume with another number of processes.
        """
        totals, replicas = self.totals.to_plain(), None
        if self.info.distributed:
            summed = EpochTotals.zeros(self.device)
            for name in ("loss_sum", "correct", "count", "skipped"):
                getattr(summed, name).copy_(distributed.all_reduce_sum(getattr(self.totals, name).clone()))
            totals = {**summed.to_plain(), "train_time_s": self.totals.train_time_s}
            replicas = distributed.gather_object({"totals": self.totals.to_plain(), "method": self._replica_state()})
        if self.info.is_main:
            self.folder.lock.check()
            self.store.save(self._state(totals, replicas), best=best)

    def _replica_state(self) -> dict[str, Any] | None:
        """This process's own SAM-family state (the F-SAM EMA) on the CPU; None where every replica has the same."""
        if not isinstance(self.optimizer, SAM) or self.config.trainer.sync_clean_pass:
            return None
        state = self.optimizer._method_state()
        return {key: [t.cpu() if torch.is_tensor(t) else t for t in value] for key, value in state.items()} or None

    def _resume(self) -> bool:
        state = self.store.load_latest(map_location=self.device)
        if state is None:
            return False
        saved_processes = state.get("processes", len(state.get("replicas") or [None]))
        try:
            before = run_key(state.get("config", {}), saved_processes)
        except FsamError:
            raise CheckpointError(
                f"the checkpoint in {self.store.folder} holds no config this version can read: delete the folder to "
                "start over"
            ) from None
        refuse_other_run(self.store.folder, before, run_key(self.config, self.info.world_size))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(
                f"the checkpoint in {self.store.folder} does not fit this run's model or optimizer "
                f"({str(error).splitlines()[0]}): delete the folder to start over"
            ) from error
        self.schedule.load_state_dict(state["schedule"])
        self.precision.load_state_dict(state["precision"])
        restore_rng(state["rng"])
        self.progress = Progress(
            epoch=state["epoch"], batch=state["batch"], global_step=state["global_step"],
            best_top1=state["best_top1"], best_epoch=state["best_epoch"], metrics=list(state["metrics"]),
            wall_time_s=state["wall_time_s"], wandb_id=state["wandb_id"], analysis=list(state.get("analysis", [])),
        )
        replicas = state.get("replicas")
        if self.info.distributed and replicas:  # the same number of processes: the run key includes it
            own = replicas[self.info.rank]
            self.totals = EpochTotals.from_plain(own["totals"], self.device)
            if own["method"] is not None:
                self.optimizer._load_method_state(own["method"])
        elif self.info.is_main:
            self.totals = EpochTotals.from_plain(state["epoch_totals"], self.device)
        self.launched_at = time.perf_counter()
        return True

    # ------------------------------------------------------------------------------------------- training

    def train(self) -> dict[str, Any]:
        config, progress = self.config, self.progress
        if self.info.is_main:
            self.folder.checkpoints.mkdir(exist_ok=True)
            self.folder.write_config(self.identity, to_plain(config))
            self.folder.rewrite_metrics(progress.metrics)
            self.folder.append_launch({
                "host": socket.gethostname(), "pid": os.getpid(), "started": now_iso(), "command": command_line(),
                "processes": self.info.world_size, "git_commit": git_commit(),
                "from_epoch": progress.epoch, "from_batch": progress.batch, "from_step": progress.global_step,
            })
        distributed.barrier()
        where = f"epoch {progress.epoch + 1}" + (f", batch {progress.batch}" if progress.batch else "")
        self.say(
            f"{'resuming' if self.resumed else 'training'} {config.optimizer.name} on {config.dataset.name} with "
            f"{self.identity['model']['label']}: {config.trainer.epochs} epochs of {self.steps_per_epoch} steps on "
            f"{self.device} (amp {self.amp}){f', from {where}' if self.resumed else ''}; records in {self.folder.path}"
        )
        for every, purpose in ((self.full_grad_every, "for the perturbation"),
                               (self.analysis_every, "to measure the EMA against")):
            if every:
                self.say(f"full-batch gradient every {every} steps {purpose}: {self._full_gradient_cost(every):.3g} "
                         "extra forward+backward passes per step on average (a SAM step does 2)")
        if self.info.is_main:
            self.mirror.start({**to_plain(config), "identity": self.identity}, resumed=self.resumed)
        try:
            while progress.epoch < config.trainer.epochs:
                self._train_epoch()
        except torch.OutOfMemoryError as error:
            self.mirror.finish(failed=True)
            raise FsamError(self._out_of_memory_message(error)) from None
        except DivergedError as error:
            if self.info.is_main:
                self.folder.write_status({
                    "status": "diverged", "message": str(error), "epoch": progress.epoch + 1,
                    "global_step": progress.global_step, "last_checkpoint": str(self.store.last),
                })
            self.mirror.finish(failed=True)
            raise
        summary = {**self._summary(), **training_fit(self.model, self.data, self.precision, self.device)}
        if self.info.is_main:
            # The final weights alone, small enough to keep for every run (the sharpness measurement reads them).
            self.folder.lock.check()
            self.store.save_final(self.model.state_dict())
            # last, and only over complete records: its presence marks the run finished
            self.folder.write_summary(summary, epochs=len(progress.metrics))
        self.say(
            f"finished: final test top-1 {summary['final_top1']:.2f}% (best test epoch, a diagnostic: "
            f"{summary['best_top1']:.2f}% at epoch {summary['best_epoch']}) in {summary['wall_time_s']:.0f} s\n"
            f"records: {self.folder.path} (config.yaml, metrics.jsonl, summary.json, checkpoints/)"
        )
        self.mirror.finish(summary)  # last: an offline run ends the output with how to upload it
        return summary

    def _train_epoch(self) -> None:
        trainer, progress, totals = self.config.trainer, self.progress, self.totals
        batch_size = trainer.batch_size
        self.train_model.train()
        # the images of this process's epoch: the last batch may be partial (dataset.drop_last=false)
        images = min(self.steps_per_epoch * batch_size, self.data.info["train_per_rank"])
        bar = tqdm(
            total=images, initial=min(progress.batch * batch_size, images), unit="img",
            unit_scale=True, desc=f"epoch {progress.epoch + 1}/{trainer.epochs}", leave=False,
            disable=None if self.info.is_main else True, file=sys.stderr,
        )
        started = time.perf_counter()
        for inputs, targets in self.data.train.iterate(progress.epoch, start_batch=progress.batch):
            self._full_gradient_work()
            out = train_step(
                self.train_model, inputs, targets, self.loss_fn, self.optimizer, precision=self.precision,
                micro_batches=trainer.micro_batches, sync_clean_pass=trainer.sync_clean_pass,
            )
            step_lr = self._lr()  # the rate this step used (a Python float, no device sync)
            self.schedule.step()
            progress.batch += 1
            progress.global_step += 1
            if out.skipped:
                totals.skipped += 1
            else:
                totals.loss_sum += out.loss.float() * len(targets)
                totals.correct += topk_correct(out.logits, targets, (1,))[0]
                totals.count += len(targets)
            bar.update(len(targets))
            if progress.global_step % trainer.log_every == 0:
                bar.set_postfix(loss=f"{self._check_finite():.4f}", lr=f"{self._lr():.4g}")
            if progress.global_step % self.wandb_every == 0 or progress.batch == self.steps_per_epoch:
                self._log_steps(step_lr)  # the epoch's last step too: every step is in one point
            every = trainer.checkpoint_every_steps
            if every and progress.global_step % every == 0 and progress.batch < self.steps_per_epoch:
                self._check_finite()
                totals.train_time_s += time.perf_counter() - started
                started = time.perf_counter()
                self._save()
            signum = self._stop_requested()
            if signum is not None:
                totals.train_time_s += time.perf_counter() - started
                started = time.perf_counter()
                self._on_signal(signum, bar)
        bar.close()
        self._check_finite()
        totals.train_time_s += time.perf_counter() - started
        self._end_epoch()

    def _full_gradient_cost(self, every: int) -> float:
        """Extra forward+backward passes per step, on average, of one pass over the training set every ``every``
        steps: (batches in the training set) / ``every``, i.e. (N / batch) / K."""
        return len(self.data.train_in_order) / every

    def _full_gradient_work(self) -> None:
        """Before the step: refresh SAM's full gradient every ``optimizer.full_grad_every`` steps, and measure
        F-SAM's EMA (the one this step's direction uses) against it every ``trainer.full_grad_analysis_every``."""
        step = self.progress.global_step
        refresh = self.full_grad_every and step % self.full_grad_every == 0
        measure = self.analysis_every and step % self.analysis_every == 0 and step > 0  # no EMA before step 1
        if not (refresh or measure):
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        full = full_gradient(self.model, self.data.train_in_order.iterate(0), self.loss_fn, params=params,
                             all_reduce_sum=distributed.all_reduce_sum)
        if refresh:
            self.optimizer.set_full_gradient(full)
        if measure:
            measured = agreement(self.optimizer.ema_estimate(), full)
            self.progress.analysis.append({"step": step, "ema_cosine": measured["cosine"],
                                           "ema_relative_error": measured["relative_error"]})
            if self.mirror.run is not None:
                self.mirror.log({"analysis/ema_cosine": measured["cosine"],
                                 "analysis/ema_relative_error": measured["relative_error"]}, step=step)

    def _log_steps(self, step_lr: float) -> None:
        """wandb: the mean training loss of the steps since the last point, and the learning rate of the last one."""
        if self.mirror.run is None:
            return
        loss_sum, count = self.totals.loss_sum.item(), self.totals.count.item()
        before_sum, before_count = self._logged_totals
        if count > before_count:
            self.mirror.log({"train/loss": (loss_sum - before_sum) / (count - before_count), "train/lr": step_lr},
                            step=self.progress.global_step)
        self._logged_totals = (loss_sum, count)

    def _out_of_memory_message(self, error: Exception) -> str:
        trainer = self.config.trainer
        detail = str(error).splitlines()[0] if str(error) else ""
        return (
            f"out of memory on {self.device} with trainer.batch_size={trainer.batch_size} ({detail}): use a smaller "
            f"trainer.batch_size (e.g. {max(trainer.batch_size // 2, 1)}), or trainer.micro_batches="
            f"{trainer.micro_batches * 2} to keep the batch and split it, or trainer.amp=bf16; the last checkpoint "
            f"in {self.store.folder} is kept"
        )

    def _lr(self) -> float:
        return self.schedule.get_last_lr()[0]

    def _stop_requested(self) -> int | None:
        """The stop signal received, if any. One process reads its own flag after every step; under DDP the
        processes agree every ``log_every`` steps, so they all stop (and save) at the same step."""
        if not self.info.distributed:
            return self.stops.received
        if self.progress.global_step % self.config.trainer.log_every:
            return None
        return self.stops.agreed(self.device)

    def _on_signal(self, signum: int, bar: tqdm) -> None:
        """Checkpoint where the loop stands (after a finished step). Then, when a handler was installed before
        the run (submitit's), hand it the signal: it requeues the job and exits, or only logs (submitit's
        SIGTERM) and training goes on. Otherwise close the wandb run and raise Interrupted."""
        self._check_finite()  # a diverged state is never saved as the state to continue from
        self._save()
        progress = self.progress
        where = f"{signal_name(signum)} in epoch {progress.epoch + 1} after step {progress.global_step}"
        if self.stops.previous_handler(signum) is not None:
            self.say(f"{where}: checkpoint saved in {self.store.folder}; passing the signal on")
            self.stops.clear()
            self.stops.forward(signum)
            return
        bar.close()
        self.mirror.finish(failed=True)
        raise Interrupted(
            f"stopped by {where}: checkpoint saved in {self.store.folder}; run the same command again to continue",
            signum,
        )

    def _check_finite(self) -> float:
        """The epoch's mean training loss so far; DivergedError if it is NaN or infinite (one host sync).

        Under DDP the sums of all processes are checked, so every process stops together or none does."""
        sums = torch.stack([self.totals.loss_sum.double(), self.totals.count.double()])
        loss_sum, count = distributed.all_reduce_sum(sums).tolist()
        mean_loss = loss_sum / max(count, 1.0)
        if not np.isfinite(mean_loss):
            progress = self.progress
            if self.store.last.exists():
                kept = f"the last good checkpoint is {self.store.last}"
            else:
                kept = "no checkpoint was written yet"
            raise DivergedError(
                f"training diverged: the loss became {mean_loss} in epoch {progress.epoch + 1} by step "
                f"{progress.global_step}; {kept}; lower optimizer.lr or optimizer.rho, or use trainer.amp=bf16 or off"
            )
        return mean_loss

    def _end_epoch(self) -> None:
        progress, totals = self.progress, self.totals
        sums = torch.stack([t.double() for t in (totals.loss_sum, totals.correct, totals.count, totals.skipped)])
        loss_sum, correct, count, skipped = distributed.all_reduce_sum(sums).tolist()
        train_time = totals.train_time_s
        distributed.broadcast_buffers(self.model)  # score the model rank 0 saves, on every shard
        test = evaluate(self.model, self.data.test, self.precision, self.device)
        if self.data.val is not None:
            test.update(evaluate(self.model, self.data.val, self.precision, self.device, split="val"))
        epoch = progress.epoch + 1
        row = {
            "epoch": epoch,
            "step": progress.global_step,
            "train_loss": loss_sum / max(count, 1.0),
            "train_top1": 100.0 * correct / max(count, 1.0),
            **test,
            "lr": self._lr(),
            "images_per_s": count / max(train_time, 1e-9),
            "skipped_steps": int(skipped),
            "epoch_time_s": train_time,
            "wall_time_s": progress.wall_time_s + self._elapsed(),
        }
        if self.analysis_every:
            row["analysis"], progress.analysis = progress.analysis, []
        progress.metrics.append(row)
        is_best = progress.best_top1 is None or row["test_top1"] > progress.best_top1
        if is_best:
            progress.best_top1, progress.best_epoch = row["test_top1"], epoch
        progress.epoch, progress.batch = epoch, 0
        self.totals = EpochTotals.zeros(self.device)
        self._save(best=is_best)
        if self.info.is_main:
            self.folder.append_metrics(row)
        self.mirror.log_epoch(row)
        self._logged_totals = (0.0, 0)
        self.say(
            f"epoch {epoch}/{self.config.trainer.epochs}  train loss {row['train_loss']:.4f} top-1 "
            f"{row['train_top1']:.2f}%  test loss {row['test_loss']:.4f} top-1 {row['test_top1']:.2f}% top-5 "
            f"{row['test_top5']:.2f}%"
            + (f"  val top-1 {row['val_top1']:.2f}%" if "val_top1" in row else "")
            + f"  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s"
            + (f"  {int(skipped)} fp16 steps skipped" if skipped else "")
        )

    def _summary(self) -> dict[str, Any]:
        progress, config = self.progress, self.config
        final = progress.metrics[-1]
        train_time = sum(row["epoch_time_s"] for row in progress.metrics)
        images = sum(row["images_per_s"] * row["epoch_time_s"] for row in progress.metrics)
        return {
            "status": "finished",
            "setting": self.identity["setting"],
            "setting_digest": self.identity["digest"],
            "wandb_id": progress.wandb_id,
            "model": self.identity["model"],
            "final_top1": final["test_top1"],
            "final_top5": final["test_top5"],
            "final_test_loss": final["test_loss"],
            "final_train_loss": final["train_loss"],
            "best_top1": progress.best_top1,
            "best_epoch": progress.best_epoch,
            **_chosen_by_validation(progress.metrics),
            "epochs": len(progress.metrics),
            "global_steps": progress.global_step,
            "skipped_steps": sum(row["skipped_steps"] for row in progress.metrics),
            "seed": config.trainer.seed,
            "method": config.optimizer.name,
            **({"full_gradient_passes_per_step": self._full_gradient_cost(self.full_grad_every)}
               if self.full_grad_every else {}),
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "amp": self.amp,
            "world_size": self.info.world_size,
            "train_time_s": train_time,
            "images_per_s": images / max(train_time, 1e-9),
            "wall_time_s": progress.wall_time_s + self._elapsed(),
            "git_commit": git_commit(),
            "versions": package_versions(),
            "data": self.data.info,
            "run_dir": str(self.folder.path),
        }


def _chosen_by_validation(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """With a validation split: its best top-1, that epoch, and the test top-1 at that epoch (the honest pick)."""
    if not metrics or "val_top1" not in metrics[0]:
        return {}
    chosen = max(metrics, key=lambda row: row["val_top1"])  # the first of equal ones
    return {"best_val_top1": chosen["val_top1"], "best_val_epoch": chosen["epoch"],
            "test_top1_at_best_val": chosen["test_top1"], "final_val_top1": metrics[-1]["val_top1"]}
