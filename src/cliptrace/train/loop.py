"""The training loop: contrastive training of a DualEncoder driven by Lightning Fabric."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.fabric import Fabric, seed_everything
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from cliptrace.data.images import ImageLoader
from cliptrace.data.pairs import PairDataset, make_collate
from cliptrace.data.policy import SKIP_REPORT, BadSamplePolicy
from cliptrace.data.readers import select_split
from cliptrace.data.stream import ShardIndex, ShardStream, check_shard_split
from cliptrace.data.record import Record
from cliptrace.evaluate import evaluate
from cliptrace.files import atomic_directory, write_text_atomic
from cliptrace.models import FrozenBackboneDualEncoder, load_model, train_tokenizer
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import adapter_class
from cliptrace.models.presets import preset_adapter
from cliptrace.train.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    prune_checkpoints,
    resume_point,
    save_checkpoint,
)
from cliptrace.train.config import TrainConfig
from cliptrace.train.metrics_log import MetricsLog
from cliptrace.train.optim import build_optimizer
from cliptrace.train.run_dir import CONFIG, RunWarning, check_run_dir, locked_run_dir

STREAM_TOKENIZER_CAPTIONS = 200_000  # captions a new model's tokenizer is trained on when streaming


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: The run directory.
        model_dir: The final model directory (loadable with :func:`cliptrace.models.load_model`).
        checkpoints: Every checkpoint kept, oldest first.
        metrics: Evaluation of the final model on the eval split (empty when there is none).
        seconds: Wall-clock training time of this invocation.
        is_main: Whether this process is the global rank 0 (the one that saved and evaluated).
        skipped: One line on the samples skipped under ``on_bad_sample="skip"``; None when none was.
    """

    run_dir: Path
    model_dir: Path
    checkpoints: list[Path]
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    is_main: bool = True
    skipped: str | None = None


def _new_model(config: TrainConfig, captions: Callable[[], list[str]]) -> DualEncoder:
    """A model to start from: the given model directory, a dual encoder of the given backbones, or a new model of the
    preset (HF CLIP or SigLIP) with a tokenizer trained on the training captions (``captions()``, called only then)."""
    if config.model is not None:
        return load_model(config.model)
    if config.image_backbone is not None:
        return FrozenBackboneDualEncoder.from_pretrained(config.image_backbone, config.text_backbone,
                                                         lock_image=config.lock_image, lock_text=config.lock_text)
    model_class = adapter_class(preset_adapter(config.preset))
    captions = captions()
    preset_context = model_class.preset_context_length(config.preset)
    tokenizer = train_tokenizer(captions, vocab_size=config.vocab_size, context_length=preset_context)
    return model_class.from_preset(config.preset, tokenizer, image_size=config.image_size)


def _keep_ids(records: list[Record], path: Path, split: str) -> list[Record]:
    """The records whose ids ``path`` lists (one per line), in dataset order.

    Raises:
        ValueError: The file names an id that is not in the split, or repeats one.
    """
    wanted = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{path}: repeats a record id")
    present = {record.id for record in records}
    unknown = [record_id for record_id in wanted if record_id not in present]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} id(s) not in split {split!r}, e.g. {unknown[0]!r}")
    keep = set(wanted)
    return [record for record in records if record.id in keep]


def _records(config: TrainConfig, policy: BadSamplePolicy, notify: bool) -> tuple[list[Record], list[Record]]:
    """The train records (only ``train_ids`` when given) and the eval records of ``config``, under ``policy``.

    ``notify``: warn when the default eval split is missing (see :func:`eval_records`).
    """
    records = policy.load(config.data, config.data_options)
    train_records = select_split(records, config.train_split)
    if config.train_ids is not None:
        train_records = _keep_ids(train_records, Path(config.train_ids), config.train_split)
    held_out = policy.load(config.val_data, config.data_options) if config.val_data is not None else records
    return policy.screen(train_records), policy.screen(eval_records(config, held_out, notify))


def eval_records(config: TrainConfig, records: Sequence[Record], notify: bool = True) -> list[Record]:
    """The records of ``config``'s eval split among ``records`` (those of ``val_data`` when given, else of ``data``).

    With ``val_data``, ``eval_split`` None keeps all of them; without it, None evaluates nothing.

    Raises:
        ValueError: The eval split has no records and ``config.eval_required`` or ``val_data`` is set; the message
            names the data and the splits it has. Otherwise an empty eval split gives no records and, when
            ``notify``, one warning saying that the run is not evaluated.
    """
    source = config.val_data if config.val_data is not None else config.data
    if config.val_data is None and not config.eval_split:
        return []
    chosen = select_split(records, config.eval_split or None)
    if chosen:
        return chosen
    counts = Counter(record.split for record in records)
    splits = ", ".join(f"{name!r} ({count})" for name, count in sorted(counts.items())) or "none"
    what = f"no records in eval split {config.eval_split!r}" if config.eval_split else "no records to evaluate"
    if config.eval_required or config.val_data is not None:
        hint = ("leave out --eval-split to evaluate every record of it" if config.val_data is not None
                else "choose one with --eval-split, or --eval-split '' to train without evaluation")
        raise ValueError(f"{source}: {what}; its splits: {splits} ({hint})")
    if notify:
        warnings.warn(f"{source}: {what} (its splits: {splits}); training without evaluation (give --eval-split or "
                      "--val-data to evaluate)", RunWarning, stacklevel=2)
    return []


def initial_model(config: TrainConfig) -> DualEncoder:
    """The model a run of ``config`` starts from, built exactly as :func:`train` builds it (same seed, tokenizer).

    Training from a saved copy of it (``TrainConfig.model``) with the same settings reproduces the run.
    """
    if config.stream:
        index = ShardIndex.scan(config.data, config.train_split)
        seed_everything(config.seed, verbose=False)
        return _new_model(config, lambda: index.captions(config.train_split, STREAM_TOKENIZER_CAPTIONS))
    policy = BadSamplePolicy(config.on_bad_sample, progress=config.progress)
    records = policy.load(config.data, config.data_options)
    train_records = policy.screen(select_split(records, config.train_split))
    seed_everything(config.seed, verbose=False)
    return _new_model(config, lambda: _captions(train_records))


def _captions(records: list[Record]) -> list[str]:
    return [caption for record in records for caption in record.captions]


def _pair_loader(config: TrainConfig, train_records: list[Record], model: DualEncoder, loader: ImageLoader,
                 world: int, rank: int) -> tuple[DataLoader, PairDataset, DistributedSampler]:
    """The DataLoader of the training records, each process reading its share of every epoch."""
    dataset = PairDataset(train_records, model.preprocess, loader=loader, caption_choice="random", seed=config.seed,
                          cache_images=config.cache_images)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.seed,
                                 drop_last=True)
    dataloader = DataLoader(dataset, batch_size=config.batch_size // world, sampler=sampler, drop_last=True,
                            collate_fn=make_collate(model.tokenize), num_workers=config.num_workers)
    return dataloader, dataset, sampler


def _stream_loader(config: TrainConfig, index: ShardIndex, model: DualEncoder, world: int, rank: int
                   ) -> tuple[DataLoader, ShardStream]:
    """The DataLoader of streamed shards (see :mod:`cliptrace.data.stream`)."""
    check_shard_split(len(index.shards), world, config.num_workers)
    dataset = ShardStream(index, model.preprocess, train_split=config.train_split, rank=rank, world=world,
                          batch_size=config.batch_size // world, seed=config.seed)
    dataloader = DataLoader(dataset, batch_size=config.batch_size // world, drop_last=True,
                            collate_fn=make_collate(model.tokenize), num_workers=config.num_workers)
    return dataloader, dataset


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``config``'s model contrastively and return where everything was saved.

    A new run writes ``config.json``, then after every ``save_every`` epochs a checkpoint
    ``checkpoints/epoch-NNNN/`` (model directory + training state, see :mod:`cliptrace.train.checkpoint`), per-step
    ``train.csv`` and per-epoch ``eval.csv`` logs (and TensorBoard when installed), and at the end ``model/`` and
    ``metrics.json``. With ``resume=True`` an existing run continues from its newest intact checkpoint (same
    settings; ``epochs`` may grow). Under ``on_bad_sample="skip"`` the run first writes ``skipped.csv``; a resumed run
    must skip the same samples. The run directory is locked for the whole run (see :mod:`cliptrace.train.run_dir`).

    Raises:
        RunBusyError: Another process is training in ``config.out``.
        ValueError: Bad settings or data, a run that may not be resumed with them, or a non-finite loss or gradient
            norm (the run stops at that step).
    """
    started = time.perf_counter()
    fabric = Fabric(
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
    )
    fabric.launch()
    with ExitStack() as stack:
        _lock_run_dir(fabric, Path(config.out), stack)
        return _train(fabric, config, resume, started)


def _lock_run_dir(fabric: Fabric, run_dir: Path, stack: ExitStack) -> None:
    """Rank 0 holds the run directory's lock until ``stack`` closes; every rank raises when it could not."""
    failure = None
    if fabric.global_rank == 0:
        try:
            stack.enter_context(locked_run_dir(run_dir))
        except OSError as error:
            failure = error
    message = fabric.broadcast(None if failure is None else str(failure), src=0)
    if failure is not None:
        raise failure
    if message is not None:
        raise OSError(message)


def _train(fabric: Fabric, config: TrainConfig, resume: bool, started: float) -> TrainResult:
    """:func:`train` once the run directory is locked."""
    run_dir = Path(config.out)
    resuming = check_run_dir(config, resume)
    fabric.barrier()  # every rank has checked the run directory before rank 0 writes into it
    world = fabric.world_size
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} processes")

    loader = ImageLoader()
    main = fabric.global_rank == 0
    policy = BadSamplePolicy(config.on_bad_sample, loader, progress=config.progress and main)
    if config.stream:
        index = ShardIndex.scan(config.data, config.train_split)
        held_out = eval_records(config, index.held_out, notify=main)
        train_count = index.samples
        captions = lambda: index.captions(config.train_split, STREAM_TOKENIZER_CAPTIONS)  # noqa: E731
    else:
        train_records, held_out = _records(config, policy, notify=main)
        train_count = len(train_records)
        captions = lambda: _captions(train_records)  # noqa: E731
    if resuming and policy.skips and not policy.matches_report(run_dir / SKIP_REPORT):
        raise ValueError(f"{run_dir / SKIP_REPORT}: the data no longer gives the samples this run skipped; it changed "
                         "since the run started, and resuming would train on other records")
    if train_count < config.batch_size:
        raise ValueError(
            f"{config.data}: split {config.train_split!r} has {train_count} records, "
            f"fewer than one batch of {config.batch_size}"
        )

    fabric.seed_everything(config.seed, verbose=False)
    resumed = resume_point(run_dir, warn=fabric.global_rank == 0)
    if resumed is not None:
        checkpoint, model, state = resumed
    else:
        model, state = _new_model(config, captions), None
    if fabric.global_rank == 0:
        policy.write_report(run_dir / SKIP_REPORT)
        config.absolute().save(run_dir / CONFIG)

    if config.stream:
        dataloader, dataset = _stream_loader(config, index, model, world, fabric.global_rank)
        sampler, steps_per_epoch = None, dataset.steps()
    else:
        dataloader, dataset, sampler = _pair_loader(config, train_records, model, loader, world, fabric.global_rank)
        steps_per_epoch = len(dataloader)
    optimizer, scheduler = build_optimizer(
        model, config.lr, config.weight_decay, config.warmup_steps, config.epochs * steps_per_epoch
    )
    start_epoch, step = 0, 0
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, step = state["epoch"], state["step"]
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{checkpoint}: its training state does not fit this run ({type(error).__name__}: "
                             f"{error})") from error
    fabric_model, optimizer = fabric.setup(model, optimizer)
    log = MetricsLog(run_dir, resume_step=step if resume else None) if fabric.global_rank == 0 else None
    scaled = config.precision in ("16", "16-mixed")

    with _progress(config.progress and fabric.global_rank == 0) as progress:
        task = progress.add_task("train", total=config.epochs * steps_per_epoch, completed=step, status="")
        for epoch in range(start_epoch, config.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            fabric_model.train()
            for batch in dataloader:  # not wrapped by Fabric: it would reset the sampler epoch on resume
                optimizer.zero_grad(set_to_none=True)
                loss = backward_step(fabric, fabric_model, fabric.to_device(batch)).item()
                _check_finite(run_dir, "loss", loss, step + 1, epoch + 1, config.grad_clip)
                grad_norm = None
                if config.grad_clip:  # checked here, not by Fabric's error_if_nonfinite, to name the step
                    clipped = fabric.clip_gradients(fabric_model, optimizer, max_norm=config.grad_clip,
                                                    error_if_nonfinite=False)
                    grad_norm = float(clipped)
                    if not scaled:  # a loss scaler skips the steps whose gradients overflow
                        _check_finite(run_dir, "the gradient norm", grad_norm, step + 1, epoch + 1, config.grad_clip)
                optimizer.step()
                scheduler.step()
                model.clamp_logit_scale()
                step += 1
                row = {"step": step, "epoch": epoch + 1, "loss": loss, "lr": scheduler.get_last_lr()[0],
                       "logit_scale": model.logit_scale.exp().item()}
                if model.logit_bias is not None:
                    row["logit_bias"] = model.logit_bias.item()
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if log is not None:
                    log.write("train", row)
                progress.update(task, advance=1, status=f"epoch {epoch + 1} loss {row['loss']:.3f}")
            epoch_done = epoch + 1
            if fabric.global_rank == 0 and held_out:
                metrics = evaluate(model, held_out, loader, device=fabric.device)
                log.write("eval", {"step": step, "epoch": epoch_done, **_scalars(metrics)})
            if epoch_done % config.save_every == 0 or epoch_done == config.epochs:
                if fabric.global_rank == 0:
                    save_checkpoint(
                        checkpoint_dir(run_dir, epoch_done),
                        model,
                        {
                            "epoch": epoch_done,
                            "step": step,
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                        },
                    )
                    prune_checkpoints(run_dir, config.keep_checkpoints)
                fabric.barrier()

    metrics = {}
    model_dir = run_dir / "model"
    if fabric.global_rank == 0:
        with atomic_directory(model_dir) as partial:
            model.save(partial)
        if held_out:
            metrics = evaluate(model, held_out, loader, device=fabric.device)
        write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        log.close()
    fabric.barrier()
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        checkpoints=list_checkpoints(run_dir),
        metrics=metrics,
        seconds=time.perf_counter() - started,
        is_main=fabric.global_rank == 0,
        skipped=policy.summary(run_dir / SKIP_REPORT),
    )


def _check_finite(run_dir: Path, what: str, value: float, step: int, epoch: int, grad_clip: float | None) -> None:
    """Stop the run at the first NaN or infinite loss or gradient norm, naming the step.

    Raises:
        ValueError: ``value`` is not finite.
    """
    if math.isfinite(value):
        return
    hint = "lower --lr" + ("" if grad_clip else ", use --grad-clip") + ", or check the model weights / data"
    raise ValueError(f"{run_dir}: {what} is {'NaN' if math.isnan(value) else value} at step {step} (epoch {epoch}); "
                     f"{hint}")


def backward_step(fabric: Fabric, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embed a batch, take the model objective's loss against the global batch and run its backward pass.

    The loss is ``model.objective.loss`` of what the model's forward returns (features, logit multiplier and, for
    models with one, the logit bias), so it comes through the forward pass DDP wraps. Under DDP each process passes
    its share of the global batch; the gradients DDP averages across processes are then those of the loss of the
    whole global batch in one process. The loss is computed in at least float32.

    Args:
        fabric: The Fabric driving the run.
        model: The DualEncoder as Fabric set it up (wrapped in DDP when distributed).
        batch: ``pixel_values``, ``input_ids`` and ``attention_mask`` of this process's rows, on its device.

    Returns:
        The loss of this process's rows (a scalar tensor).
    """
    outputs = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    dtype = torch.promote_types(outputs[0].dtype, torch.float32)
    loss = model.objective.loss(*(output.to(dtype) for output in outputs))
    fabric.backward(loss)
    return loss


def _scalars(metrics: dict) -> dict[str, int | float]:
    """The top-level numeric entries of a metrics dict (per-class breakdowns stay in metrics.json)."""
    return {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
