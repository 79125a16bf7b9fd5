"""`cal-pose train`: one training loop for every method and both CAL stages.

- heatmap / dark: Gaussian heatmaps, MSE (Eq. 3); dark differs at decode only.
- udp: binary disk + offsets, Eq. 8.
- cal stage 1: Gaussian-weighted disk G = B * C (Eq. 10), offsets weighted by G (Eq. 14).
- cal stage 2: starts from the stage-1 checkpoint (``--init``); the offset loss is
  weighted by the Mixed Gaussian Masks (Eq. 15), placed from ``gmm.json``
  (``--mgm-update static``) or refitted per mini-batch by EM warm-started from
  it (``--mgm-update batch``, Alg. 1).

The loop runs on a CPU, one GPU (``--amp``: bf16 autocast where supported,
fp16 + GradScaler otherwise; ignored on the CPU) or several processes under ``torchrun`` (DDP;
gloo on CPU, NCCL on GPU). Rank 0 writes ``<out>/last.pt`` atomically after
every epoch (and every ``--checkpoint-every`` steps) and ``<out>/model.pt``
at the end; ``--resume`` continues from ``last.pt`` exactly (same batches,
same RNG states). A non-finite loss or gradient stops the run before the
optimiser step, with an error naming the epoch and step; the last good
checkpoint stays. MLflow goes through
:mod:`cal_core.tracking`, which never lets an unreachable server stop training.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import resource
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cal_core import checkpoint, distributed, storage, tracking
from cal_core.config import STAGE2_TRAIN, TrainConfig, parse_steps
from cal_core.data.dataset import ShardDataset, add_targets, fork_safe_opencv
from cal_core.stage2 import MaskMaker, freeze_frozen_norms, trainable_parameters

log = logging.getLogger(__name__)


#: Written after each validation during training: which checkpoint (training id, step) it scored.
VALIDATED = "validated.json"


class SetupError(ValueError):
    """Training cannot start (bad settings, shards, checkpoint or resume state); the message says which."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped, the last good checkpoint is kept."""


@dataclass
class Session:
    """Everything one run trains with (built once; restored from a checkpoint on resume)."""

    config: TrainConfig
    ctx: distributed.DistContext
    codec: Any
    dataset: ShardDataset
    model: nn.Module
    ddp_model: nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    masks: MaskMaker | None
    model_config: dict[str, Any]
    shards_sha256: str  # the training manifest's, read once: checkpoints, resume checks and params name it
    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    mlflow_run_id: str = ""  # the stage's MLflow run, kept in last.pt so a resumed attempt logs to it
    # last.pt is written before the epoch's validation (a failing one must not cost the epoch) and says
    # whether one was due: a resumed attempt runs it first, unless <out>/validated.json records it done.
    val_pending: bool = False
    # names this training across its attempts (kept in last.pt), so a validated.json left by another
    # training in the same --out is not taken for this one's
    training_id: str = field(default_factory=lambda: uuid.uuid4().hex)


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``cal-pose train`` (docs/architecture.md, CLI contract)."""
    add = parser.add_argument
    add("--shards", required=True, help="training shards: <dir or s3 prefix> with manifest.json")
    add("--val-shards", default=None, help="validation shards (GT or detection boxes) for COCO AP every "
                                              "--val-every epochs")
    add("--method", required=True, choices=("heatmap", "dark", "udp", "cal"))
    add("--stage", type=int, default=1, choices=(1, 2), help="CAL training stage (2 needs --init and --gmm)")
    add("--backbone", default="tiny")
    add("--head", default="auto", help="auto = the method's head (heatmap, offset or dual)")
    add("--epochs", type=int, default=None, help="default 210 (stage 1) or 40 (stage 2)")
    add("--batch-size", type=int, default=32, help="per process")
    add("--lr", type=float, default=None, help="Adam learning rate; default 1e-3 (stage 1) or 1e-4 (stage 2)")
    add("--lr-steps", default=None, help="epochs where lr is multiplied by 0.1, e.g. 170,200 ('' = none; "
        "default/'auto': stage 1 at the paper's 170/210 and 200/210 of --epochs, stage 2 none)")
    add("--weight-decay", type=float, default=0.0)
    add("--alpha", type=float, default=None,
        help="offset loss weight of Eqs. 8, 14, 15 (default: the authors' balance, udp 0.7, cal 1.4)")
    add("--workers", type=int, default=2, help="data loader worker processes")
    add("--out", required=True, help="run folder (local or s3://): last.pt, model.pt")
    add("--init", default=None, help="checkpoint to start from (stage 2: the stage-1 model.pt)")
    add("--weights", default=None, help="stage 1: pretrained weights to start from (local or s3://), e.g. an "
        "ImageNet HRNet/ResNet backbone state dict, as the paper's models (cal_core.models.weights)")
    add("--gmm", default=None, help="gmm.json from cal-pose fit-gmm (stage 2)")
    add("--mgm-update", default="static", choices=("static", "batch"),
        help="stage 2: masks from gmm.json (static) or refitted per mini-batch (batch, Alg. 1)")
    add("--stage2-train", default=None, choices=STAGE2_TRAIN,
        help="stage 2: train the whole net (all) or only the offset branch (offset)")
    add("--resume", action="store_true", help="continue from <out>/last.pt when it exists")
    add("--val-every", type=int, default=1, help="validate every K epochs (0 = never)")
    add("--no-val-flip", action="store_true", help="validate without the flip test")
    add("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0 = per epoch only)")
    add("--log-every", type=int, default=10, help="log step metrics every N steps")
    add("--max-steps", type=int, default=0, help="stop after N optimizer steps in total (0 = no limit)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--amp", action="store_true", help="mixed precision on the GPU: bf16 where supported, else fp16 + "
                                            "GradScaler (ignored with a warning on the CPU)")
    add("--seed", type=int, default=0)
    add("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume on CPU)")
    add("--no-augment", action="store_true", help="train without augmentation")
    add("--threads", type=int, default=0, help="torch CPU threads per process (0 = cores minus --workers)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--experiment", default=None, help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME or cal-pose)")
    add("--run-name", default=None)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from parsed CLI flags."""
    extra = {} if args.stage2_train is None else {"stage2_train": args.stage2_train}
    return TrainConfig(
        shards=args.shards, out=args.out, method=args.method, stage=args.stage, val_shards=args.val_shards,
        backbone=args.backbone, head=args.head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_steps=parse_steps(args.lr_steps), weight_decay=args.weight_decay, alpha=args.alpha,
        workers=args.workers, init=args.init, weights=args.weights, gmm=args.gmm, mgm_update=args.mgm_update,
        resume=args.resume,
        val_every=args.val_every, val_flip=not args.no_val_flip, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, max_steps=args.max_steps, device=args.device, amp=args.amp, seed=args.seed,
        deterministic=args.deterministic, augment=not args.no_augment, threads=args.threads,
        progress=not args.no_progress, experiment=args.experiment, run_name=args.run_name, **extra,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cal-pose train`` (a :class:`SetupError` is one line and exit 2, from cal_core.cli)."""
    uri = train(config_from_args(args))
    if uri:
        print(uri)
    return 0


# ----------------------------------------------------------------------------- set-up


def _seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def cpu_threads(requested: int, workers: int) -> int:
    """Torch CPU threads: ``requested``, or (0) this rank's share of the cores minus its loader workers, >= 1.

    On a 2-core machine, 2 torch threads next to a busy loader worker made
    training ~10x slower (31 vs 315 samples/s measured): spinning threads
    fight for the core the worker needs.
    """
    if requested > 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: ranks sharing this machine
    return max(1, cores // ranks - workers)


def amp_dtype_for(device: torch.device, amp: bool) -> torch.dtype | None:
    """Autocast dtype: None without --amp or off the GPU; bf16 on GPUs that support it, else fp16.

    ``--amp`` is for GPUs (the pipeline sets it by default): bf16 autocast on
    the CPU is an order of magnitude slower than float32 (tiny net, batch 32,
    64x48, 2 threads: 776 vs 66 ms a training step), so there it is ignored
    with a warning.
    """
    if not amp:
        return None
    if device.type != "cuda":
        log.warning("--amp ignored on %s: mixed precision is for GPUs (bf16 autocast is slower on the CPU)",
                    device.type)
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _manifest_digest(uri: str) -> tuple[dict[str, Any], str]:
    """The shard set's manifest and its sha256 (logged so a run names its exact data)."""
    raw = storage.read_bytes(storage.join(uri, "manifest.json"))
    return json.loads(raw), hashlib.sha256(raw).hexdigest()


def _check_trainable(manifest: dict[str, Any], uri: str) -> None:
    """Refuse shards cut from detector boxes (no keypoint labels); warn about a val split.

    Detection boxes carry no keypoints, so every loss term is 0: such a run
    once trained for its epochs at loss 0 and wrote its random weights as
    model.pt, exit 0. A val split keeps people without a labelled keypoint
    (COCO's val rule, for COCOeval), which add nothing but time.
    """
    settings = manifest.get("settings", {})
    if settings.get("box_source") == "detections":
        raise ValueError(f"{uri} was cut from detector boxes, which carry no keypoint labels (every loss would "
                         "be 0): train on a split cut from its ground-truth annotations")
    if manifest.get("split") == "val":
        log.warning("%s is a val split: people without a labelled keypoint are kept there (COCO's val rule) and "
                    "add no loss; train on the train split", uri)


def _build_model(config: TrainConfig, input_size: tuple[int, int], device: torch.device) -> tuple[nn.Module, str]:
    """The network for the method (stage 2: initialised from the stage-1 checkpoint)."""
    from cal_core.models import build_model, default_head, load_checkpoint

    head = default_head(config.method) if config.head == "auto" else config.head
    model = build_model(config.backbone, head, input_size=input_size, weights=config.weights)
    if config.init:
        state = load_checkpoint(config.init)
        init_cfg = state.get("config", {})
        if tuple(init_cfg.get("input_size", input_size)) != tuple(input_size):
            raise ValueError(f"--init {config.init} was trained at {init_cfg.get('input_size')}, "
                             f"the shards are {list(input_size)}")
        for key, value in (("method", config.method), ("backbone", config.backbone)):
            if init_cfg.get(key, value) != value:
                raise ValueError(f"--init {config.init} is a {init_cfg[key]} {key} checkpoint, this run trains "
                                 f"{value} (stage 2 starts from a stage-1 model of the same {key})")
        model.load_state_dict(state["model"])
        log.info("initialised from %s", config.init)
    return model.to(device), head


def _optimizer(params: list[nn.Parameter], config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Adam + MultiStepLR (x lr_factor at the lr_steps epochs), as the paper (§5.2)."""
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.lr_steps), config.lr_factor)
    return optimizer, scheduler


def build_session(config: TrainConfig, ctx: distributed.DistContext) -> Session:
    """Codec, data, model, optimiser, schedule, AMP and (stage 2) the mask maker for one run."""
    from cal_core.codecs import build_codec, parse_size
    from cal_core.losses import build_loss
    from cal_core.models import default_head

    manifest, shards_sha256 = _manifest_digest(config.shards)
    _check_trainable(manifest, config.shards)
    input_size = parse_size(manifest["input_size"])
    if config.val_shards and config.val_every:  # refused now, not after the first epoch has trained
        from cal_core.evaluate import ModelInfo, check_shard_set
        from cal_core.skeleton import NUM_KEYPOINTS

        check_shard_set(ModelInfo("", input_size, NUM_KEYPOINTS, "", "torch"), config.val_shards, scorable=True)
    codec = build_codec(config.method, input_size)
    dataset = ShardDataset(config.shards, codec, train=config.augment, seed=config.seed)
    model, head = _build_model(config, input_size, ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    masks = None
    if config.stage == 2:
        params = trainable_parameters(model, config.stage2_train, input_size)
        gather = functools.partial(distributed.all_gather_rows, ctx=ctx) if ctx.distributed else None
        masks = MaskMaker.from_uri(config.gmm, config.mgm_update, codec.radius, codec.heatmap_size, gather)
    ddp_model = model
    if ctx.distributed:  # a --head other than the method's may have outputs its loss never reads
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=head != default_head(config.method))
    optimizer, scheduler = _optimizer(params, config)
    amp_dtype = amp_dtype_for(ctx.device, config.amp)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)
    model_config = {"method": config.method, "backbone": config.backbone, "head": head,
                    "input_size": list(input_size), "num_joints": 17, "codec": codec.config(),
                    "stage": config.stage, "train": config.to_dict()}
    return Session(config, ctx, codec, dataset, model, ddp_model, build_loss(config.method, config.stage,
                   config.alpha), optimizer, scheduler, scaler, amp_dtype, masks, model_config, shards_sha256)


# ----------------------------------------------------------------------------- checkpoints


def _state(s: Session) -> dict[str, Any]:
    """The full resumable state (tensors and primitives only: weights_only-loadable)."""
    return {
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(), "scaler": s.scaler.state_dict(),
        "epoch": s.epoch, "epoch_step": s.epoch_step, "step": s.step, "rng": checkpoint.rng_state(),
        "mgm": s.masks.params.to_dict() if s.masks is not None else None,
        "config": s.model_config, "code_version": checkpoint.code_version(),
        "world_size": s.ctx.world_size, "train_manifest_sha256": s.shards_sha256,
        "mlflow_run_id": s.mlflow_run_id, "val_pending": s.val_pending, "training_id": s.training_id,
    }


def _save_last(s: Session) -> None:
    """Rank 0 writes ``<out>/last.pt`` atomically; other ranks wait so none runs ahead."""
    if s.ctx.is_main:
        checkpoint.save(storage.join(s.config.out, checkpoint.LAST), _state(s))
    distributed.barrier(s.ctx)


def _restore(s: Session, uri: str) -> None:
    """Load a ``last.pt`` into the session (model, optimiser, schedule, scaler, counters, RNG)."""
    from cal_core import mgm

    state = checkpoint.load(uri)
    _check_resumable(s, state, uri)
    s.model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] or not s.scaler.is_enabled():  # written without fp16 (no amp, bf16): an empty state
        s.scaler.load_state_dict(state["scaler"])
    s.epoch, s.epoch_step, s.step = state["epoch"], state["epoch_step"], state["step"]
    s.mlflow_run_id = state.get("mlflow_run_id") or ""
    s.training_id = state.get("training_id") or s.training_id
    # the validation the attempt before owed, if this run validates at all (else there is nothing to score on)
    s.val_pending = bool(state.get("val_pending", False) and s.config.val_shards and s.config.val_every
                         and _validated(s.config.out) != (s.training_id, s.step))
    if s.masks is not None and state.get("mgm"):
        s.masks.params = mgm.GMMParams.from_dict(state["mgm"], source=uri)
    checkpoint.set_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d, step %d (%d into the epoch)", uri, s.epoch, s.step, s.epoch_step)


def _check_resumable(s: Session, state: dict[str, Any], uri: str) -> None:
    """Refuse to resume a ``last.pt`` that another setting or data set wrote (ValueError naming both).

    The epoch's batches come from (seed, world size) and the shards: a
    mid-epoch resume with another seed or rank count, or on other shards,
    would train some samples twice and skip others. The optimisation
    settings must match too: the optimiser and schedule are restored from
    the checkpoint, so a new ``--lr`` or ``--lr-steps`` would be ignored
    while ``model.pt`` recorded it; so must the objective and its inputs
    (``--alpha``, ``--no-augment``, ``--weights``, and in stage 2 ``--gmm``,
    whose mixture the checkpoint restores, and ``--init``), or the run would
    change them midway and record only the new ones (older checkpoints lack
    some of these: not checked then). Those files are compared by location
    (:func:`storage.canonical`): ``./gmm.json`` and its absolute path agree.
    """
    saved = state["config"]["train"]
    now = {key: getattr(s.config, key) for key in ("method", "stage", "backbone", "batch_size", "seed")}
    was = {key: saved.get(key) for key in now}
    optimisation = {"lr": s.config.lr, "lr_steps": list(s.config.lr_steps), "lr_factor": s.config.lr_factor,
                    "weight_decay": s.config.weight_decay, "stage2_train": s.config.stage2_train,
                    "mgm_update": s.config.mgm_update, "alpha": s.config.alpha, "augment": s.config.augment,
                    "weights": s.config.weights, "gmm": s.config.gmm, "init": s.config.init}
    now.update(optimisation)
    was.update({key: saved.get(key, value) for key, value in optimisation.items()})
    shards = "training shards (manifest sha256)"
    now[shards] = s.shards_sha256
    was[shards] = state.get("train_manifest_sha256", now[shards])  # older checkpoints did not record it
    if state["epoch_step"]:  # between epochs any number of ranks may go on
        now["world size (mid-epoch)"] = s.ctx.world_size
        was["world size (mid-epoch)"] = state.get("world_size", s.ctx.world_size)
    for key in ("weights", "gmm", "init"):  # a file named by another spelling is the same input
        if was[key] and now[key] and storage.canonical(was[key]) == storage.canonical(now[key]):
            was[key] = now[key]
    for key, value in now.items():
        if was[key] != value:
            raise ValueError(f"cannot resume {uri}: it was trained with {key}={was[key]!r}, "
                             f"this run asks for {value!r} (to change it, train into a new --out from "
                             f"these weights: --weights {uri} in stage 1, --init in stage 2)")


# ----------------------------------------------------------------------------- the loop


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move a (nested dict/list of) tensor batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], s: Session) -> None:
    """Stop every rank together, before the optimiser step, when the loss or a gradient is NaN/inf on any rank.

    A finite loss can still give a non-finite gradient (an overflow in the
    backward pass): Adam would write it into the weights and the next save
    would keep them. With fp16 autocast the GradScaler handles gradients
    itself (it skips such steps and lowers its scale), so only the loss is
    checked then. Both flags stay on the device and cross the ranks in one
    all-reduce: one host sync per step.
    """
    grads = [p.grad for p in s.model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm(grads, float("inf")) if grads and not s.scaler.is_enabled() \
        else torch.zeros((), device=s.ctx.device)
    local = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm)]).float()
    if not bool(distributed.all_reduce_sum(local, s.ctx).any()):
        return
    loss_bad, grad_bad = (bool(v) for v in local.tolist())
    if loss_bad:
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        what = f"loss {float(loss.detach()):.4g} ({detail})"
    else:
        what = "gradient (a finite loss, an overflow in the backward pass)" if grad_bad else "values on another rank"
    last = checkpoint.latest(s.config.out)
    raise NonFiniteLossError(
        f"non-finite {what} at epoch {s.epoch + 1}, step {s.step + 1} (batch {s.epoch_step + 1} of the epoch); "
        f"stopped without updating the weights. Last good checkpoint: {last or 'none yet'}")


def train_step(s: Session, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step on one batch; returns the loss and its terms (detached)."""
    batch = add_targets(_to_device(batch, s.ctx.device), s.codec)
    autocast = torch.autocast(s.ctx.device.type, dtype=s.amp_dtype) if s.amp_dtype else contextlib.nullcontext()
    with autocast:
        outputs = s.ddp_model(batch["image"])
    outputs = {k: v.float() for k, v in outputs.items()}
    mgm_masks = None
    if s.masks is not None:
        mgm_masks = s.masks(outputs["heatmap"], batch["joints_hm"], batch["weights"])
    loss, terms = s.loss_fn(outputs, batch["targets"], batch["weights"], mgm_masks)
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    _check_finite(loss, terms, s)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return loss.detach(), terms


def _loader(s: Session) -> DataLoader:
    """This epoch's loader: this rank's batches of the epoch permutation, minus those already done."""
    sampler = distributed.EpochBatchSampler(len(s.dataset), s.config.batch_size, s.ctx.rank,
                                            s.ctx.world_size, s.config.seed, blocks=s.dataset.shard_starts,
                                            window=s.dataset.window)
    sampler.set_epoch(s.epoch, s.epoch_step)
    s.dataset.set_epoch(s.epoch)
    generator = torch.Generator().manual_seed(s.config.seed * 7919 + s.epoch)
    fork_safe_opencv(s.config.workers)
    return DataLoader(s.dataset, batch_sampler=sampler, num_workers=s.config.workers, generator=generator,
                      pin_memory=s.ctx.device.type == "cuda", persistent_workers=False)


def _progress(s: Session, loader: DataLoader) -> Iterator[Any]:
    """Batches with a tqdm bar (main rank only) showing loss and samples/s."""
    if not (s.config.progress and s.ctx.is_main):
        return iter(loader)
    from tqdm import tqdm

    return iter(tqdm(loader, desc=f"epoch {s.epoch + 1}/{s.config.epochs}", leave=False, dynamic_ncols=True))


def _batches_per_epoch(s: Session) -> int:
    return distributed.EpochBatchSampler(len(s.dataset), s.config.batch_size, s.ctx.rank,
                                         s.ctx.world_size).batches_per_epoch


def _done(s: Session) -> bool:
    return bool(s.config.max_steps) and s.step >= s.config.max_steps


def train_epoch(s: Session, tracker: tracking.Tracker | None) -> dict[str, float]:
    """One epoch (or its remainder after a resume); returns epoch metrics."""
    s.ddp_model.train()
    if s.config.stage == 2 and s.config.stage2_train == "offset":
        freeze_frozen_norms(s.model)
    totals: dict[str, float] = {}
    seen, started = 0, time.perf_counter()
    bar = _progress(s, _loader(s))
    for batch in bar:
        if _STOP_REQUESTED.is_set():
            raise KeyboardInterrupt
        loss, terms = train_step(s, batch)
        s.step, s.epoch_step = s.step + 1, s.epoch_step + 1
        n = int(batch["image"].shape[0])
        seen += n
        for key, value in {"loss": loss, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
        rate = seen / max(time.perf_counter() - started, 1e-9)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(loss):.4g}", samples_s=f"{rate:.0f}")
        if tracker is not None and s.step % s.config.log_every == 0:
            step_metrics = {"step_loss": float(loss), **{f"step_loss_{k}": float(v) for k, v in terms.items()}}
            tracker.log_metrics({**step_metrics, "lr": s.optimizer.param_groups[0]["lr"]}, step=s.step)
        if s.config.checkpoint_every and s.step % s.config.checkpoint_every == 0:
            _save_last(s)
        if _done(s):
            break
    return _epoch_metrics(s, totals, seen, time.perf_counter() - started)


def _epoch_metrics(s: Session, totals: dict[str, float], seen: int, seconds: float) -> dict[str, float]:
    """Loss means, samples seen (all ranks), samples/s, peak memory and learning rate of one epoch.

    The lr is logged per epoch too: step metrics come every ``--log-every``
    steps, which an epoch of fewer steps never reaches.
    """
    keys = sorted(totals)
    packed = torch.tensor([seen, *[totals[k] for k in keys]], dtype=torch.float64, device=s.ctx.device)
    summed = distributed.all_reduce_sum(packed, s.ctx).tolist()
    count = max(summed[0], 1.0)
    metrics = {k: v / count for k, v in zip(keys, summed[1:], strict=True)}
    metrics.update(samples_seen=summed[0], samples_per_s=summed[0] / max(seconds, 1e-9), epoch_seconds=seconds,
                   peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                   lr=s.optimizer.param_groups[0]["lr"])
    if s.ctx.device.type == "cuda":
        metrics["cuda_peak_mb"] = torch.cuda.max_memory_allocated(s.ctx.device) / 2**20
    return metrics


# ----------------------------------------------------------------------------- validation and the run


def validate(s: Session) -> dict[str, float]:
    """COCO keypoint AP on ``--val-shards`` (GT or detection boxes) through :mod:`cal_core.evaluate`."""
    from cal_core.evaluate import evaluate_model

    metrics = evaluate_model(s.model, s.codec, s.config.val_shards, flip=s.config.val_flip,
                             device=s.ctx.device, batch_size=max(s.config.batch_size, 64),
                             progress=s.config.progress)
    return {f"val_{k}": v for k, v in tracking.defined_metrics(metrics).items()}


def _run_params(s: Session) -> dict[str, Any]:
    """Everything that defines the run, for MLflow: settings, data digest, code version, model size."""
    return {**s.config.to_dict(), "head": s.model_config["head"], "input_size": s.model_config["input_size"],
            "codec": s.model_config["codec"], "train_manifest_sha256": s.shards_sha256,
            "code_version": checkpoint.code_version(), "world_size": s.ctx.world_size,
            "device": str(s.ctx.device), "amp_dtype": str(s.amp_dtype) if s.amp_dtype else "off",
            "train_instances": len(s.dataset), "parameters": sum(p.numel() for p in s.model.parameters())}


def _finish(s: Session, tracker: tracking.Tracker | None) -> str:
    """Write ``<out>/model.pt`` (final weights + config) and log it as an artifact."""
    uri = storage.join(s.config.out, checkpoint.FINAL)
    if s.ctx.is_main:
        final = {"model": s.model.state_dict(), "config": s.model_config, "epoch": s.epoch, "step": s.step,
                 "code_version": checkpoint.code_version()}
        if tracker is not None and tracker.run_id:  # the exported ONNX and the registry link back to it
            final["run_id"] = tracker.run_id
        if s.masks is not None:
            final["mgm"] = s.masks.params.to_dict()
        checkpoint.save(uri, final)
        if tracker is not None:
            _log_file(tracker, uri, "model")
    distributed.barrier(s.ctx)
    return uri


def _log_file(tracker: tracking.Tracker, uri: str, artifact_path: str) -> None:
    """Log a local file (or a downloaded copy of a remote one) as an MLflow artifact."""
    import tempfile
    from pathlib import Path

    from cal_core.uris import fetch_local

    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(fetch_local(uri, Path(tmp) / Path(uri).name), artifact_path)


def _loop(s: Session, tracker: tracking.Tracker | None) -> None:
    """Epochs from where the session stands to the end (or --max-steps, possibly mid-epoch)."""
    if s.val_pending:  # the attempt before stopped between its checkpoint and that epoch's validation
        _pending_validation(s, tracker)
    while s.epoch < s.config.epochs and not _done(s):
        metrics = train_epoch(s, tracker)
        batches = _batches_per_epoch(s)
        finished = s.epoch_step >= batches
        if finished:
            s.epoch, s.epoch_step = s.epoch + 1, 0
            s.scheduler.step()
        s.val_pending = bool(finished and s.config.val_shards and s.config.val_every and (
            s.epoch % s.config.val_every == 0 or s.epoch == s.config.epochs))
        _save_last(s)  # before validating: a failing evaluation must not cost the epoch just trained
        if s.val_pending and s.ctx.is_main:
            metrics.update(_validate_checkpoint(s))
        s.val_pending = False
        label = f"{s.epoch}/{s.config.epochs}" if finished else \
            f"{s.epoch + 1}/{s.config.epochs} (stopped after batch {s.epoch_step})"
        _report_epoch(s, tracker, metrics, s.epoch + s.epoch_step / batches, label)


def _pending_validation(s: Session, tracker: tracking.Tracker | None) -> None:
    """Validate the restored epoch (rank 0) and log it at its step, so no val point (nor the last) goes missing."""
    if s.ctx.is_main:
        _report_epoch(s, tracker, _validate_checkpoint(s), float(s.epoch),
                      f"{s.epoch}/{s.config.epochs} (validation after resume)")
    s.val_pending = False


def _validate_checkpoint(s: Session) -> dict[str, float]:
    """Validate the weights ``last.pt`` was just saved with, then record that in ``<out>/validated.json``.

    ``last.pt`` is written before validating (a failing evaluation must not
    cost the epoch) and so says ``val_pending``; the record, a small atomic
    write, tells a resume of that checkpoint (a retried task, a rerun of a
    finished training) that its validation was done and logged already.
    """
    metrics = validate(s)
    record = {"training_id": s.training_id, "step": s.step, "epoch": s.epoch, "metrics": metrics}
    storage.write_bytes(storage.join(s.config.out, VALIDATED), json.dumps(record, indent=1).encode())
    return metrics


def _validated(out: str) -> tuple[str, int] | None:
    """``(training_id, step)`` of the last validation recorded in ``<out>/validated.json``; None if none."""
    try:
        record = json.loads(storage.read_bytes(storage.join(out, VALIDATED)))
        return str(record["training_id"]), int(record["step"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s in %s (%s): the checkpoint is validated again", VALIDATED, out, exc)
        return None


def _report_epoch(s: Session, tracker: tracking.Tracker | None, metrics: dict[str, float], epoch: float,
                  label: str) -> None:
    """Log ``epoch <label>: <metrics>`` and send the metrics to MLflow at the current step.

    ``epoch`` is the (fractional, for a partial epoch) epoch logged with them.
    """
    log.info("epoch %s: %s", label, _metrics_text(metrics))
    if tracker is not None:
        tracker.log_metrics({**metrics, "epoch": epoch}, step=s.step)


def _metrics_text(metrics: dict[str, float]) -> str:
    """``name=value, ...`` (sorted, 4 significant digits) for the epoch log lines."""
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


#: Set by the first Ctrl-C during :func:`train`; the loop stops at the next step boundary.
_STOP_REQUESTED = threading.Event()


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[None]:
    """Turn the first SIGINT into a stop at the next step boundary; a second one raises at once.

    Python's default handler raises KeyboardInterrupt wherever the main
    thread is. When that is a logging at-fork callback while the DataLoader
    forks its workers, the exception is reported as "ignored" and lost:
    training went on to its last epoch (3 of 11 Ctrl-Cs with --val-shards).
    A flag checked between steps cannot be lost that way. A process started
    with SIGINT ignored (a background job of a script, ``nohup``-style
    launchers) keeps ignoring it, as Python itself does.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    owner = os.getpid()

    def request_stop(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked loader worker: the training process stops it
            return
        if _STOP_REQUESTED.is_set():
            raise KeyboardInterrupt
        _STOP_REQUESTED.set()
        log.warning("interrupted: stopping after this step (Ctrl-C again to stop at once)")

    _STOP_REQUESTED.clear()
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP_REQUESTED.clear()


def train(config: TrainConfig) -> str:
    """Train as ``config`` says; returns the URI of ``<out>/model.pt``."""
    with _ctrl_c_between_steps():
        return _train(config)


def _train(config: TrainConfig) -> str:
    """:func:`train` inside its SIGINT handling."""
    torch.set_num_threads(cpu_threads(config.threads, config.workers))
    ctx = distributed.init(config.device)
    try:
        _check_out(config, ctx.is_main)
        # rank 0 alone writes to --out: it holds the lock that refuses a second training into it
        with storage.exclusive(config.out, "training") if ctx.is_main else contextlib.nullcontext():
            return _run(config, ctx)
    finally:
        distributed.shutdown(ctx)


def _run(config: TrainConfig, ctx: distributed.DistContext) -> str:
    """Build or restore the session, train it and write ``model.pt`` (its URI); rank 0 logs to MLflow."""
    if ctx.is_main:  # checkpoint copies a killed save left (each the size of the checkpoint)
        for name in (checkpoint.LAST, checkpoint.FINAL):
            storage.remove_temporaries(config.out, name)
    _seed_everything(config.seed, config.deterministic)
    s, last = _start(config, ctx)
    if not ctx.is_main:
        _loop(s, None)
        return _finish(s, None)
    # stage tag "train-s1"/"train-s2" for every method: the pipeline's training node has one name.
    # A resumed attempt (a retried pod) continues the run it started, whose params are logged already.
    with tracking.stage_run(f"train-s{config.stage}",
                            config.experiment, config.run_name or _default_run_name(config),
                            local_dir=config.out, resume_run_id=s.mlflow_run_id) as tracker:
        if not s.mlflow_run_id or tracker.run_id != s.mlflow_run_id:  # a new run (none, or not reattached)
            tracker.log_params(_run_params(s))
        s.mlflow_run_id = tracker.run_id or ""
        tracker.set_tags({"cal_pose.method": config.method, "cal_pose.resumed_from": last or ""})
        _loop(s, tracker)
        return _finish(s, tracker)


def _check_out(config: TrainConfig, probe: bool) -> None:
    """:class:`SetupError` if ``out`` holds a training this run does not ``resume``, or (``probe``) is unwritable.

    Without the check a typo'd rerun replaced a finished model.pt and its
    last.pt after one epoch; an unwritable out failed only at the first save.
    Only the main rank probes (it alone writes there; probes of several
    ranks would remove each other's folder).
    """
    try:
        if probe:
            storage.check_writable(config.out)
    except ValueError as exc:
        raise SetupError(f"--out: {exc}") from exc
    found = [name for name in (checkpoint.LAST, checkpoint.FINAL) if storage.exists(storage.join(config.out, name))]
    if found and not config.resume:
        raise SetupError(f"{config.out} already holds a training ({', '.join(found)}): --resume continues it, "
                         "another --out starts a new one")


def _start(config: TrainConfig, ctx: distributed.DistContext) -> tuple[Session, str | None]:
    """The session, restored from the latest checkpoint when resuming (and its URI); :class:`SetupError` if bad."""
    try:
        s = build_session(config, ctx)
        last = checkpoint.latest(config.out) if config.resume else None
        if last:
            _restore(s, last)
    except (ValueError, FileNotFoundError) as exc:
        raise SetupError(str(exc)) from exc
    return s, last


def _default_run_name(config: TrainConfig) -> str:
    stage = f"-s{config.stage}" if config.method == "cal" else ""
    return f"train-{config.method}{stage}-{config.backbone}"

