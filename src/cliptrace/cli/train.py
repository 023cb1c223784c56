"""``cliptrace train``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.options import DataOptions
from cliptrace.data.readers import SUPPORTED
from cliptrace.train.config import TrainConfig, run_data_options

console = Console()
DEFAULT_EVAL_SPLIT = "val"


def _eval_settings(eval_split: str | None, has_val_data: bool) -> dict:
    """``eval_split`` and ``eval_required`` of the config for ``--eval-split`` as given (None: not given).

    Not given: every record of --val-data, or the val split of DATA when it has one (no evaluation otherwise).
    Given: that split, which must have records ('' skips evaluation, or takes all of --val-data).
    """
    if eval_split is None:
        return {"eval_split": None if has_val_data else DEFAULT_EVAL_SPLIT, "eval_required": has_val_data}
    return {"eval_split": eval_split or None, "eval_required": bool(eval_split) or has_val_data}


def _check_backbone_options(image_backbone: Path | None, preset: str | None, vocab_size: int | None) -> None:
    """Refuse the options of a new preset model beside backbones (the training config cannot tell them given: it
    holds their defaults). Raises ValueError naming the options."""
    given = [name for name, value in (("--preset", preset), ("--vocab-size", vocab_size)) if value is not None]
    if image_backbone is not None and given:
        raise ValueError(f"{' and '.join(given)} set up a new preset model: they do not go with --image-backbone")


@with_data_options
def train_command(
    data: Annotated[Path, typer.Argument(help=f"Dataset: {SUPPORTED}.")],
    data_options: DataOptions,
    out: Annotated[Path, typer.Option(help="Run directory for config, logs, checkpoints and the final model.")],
    model: Annotated[Optional[Path], typer.Option(help="Start from this model directory instead of a new model.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="Size preset of a new model: HF CLIP (tiny, small, base; default tiny) or SigLIP (siglip-tiny, "
             "siglip-small, siglip-base).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input resolution of a new model (default: the preset's).")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(
        help="BPE vocabulary trained on the captions of a new model (default 1024).")] = None,
    image_backbone: Annotated[Optional[Path], typer.Option(
        help="Train a dual encoder of two local HuggingFace backbones with new linear heads (LiT) instead of a preset "
             "model: this image model directory (ViT, ResNet, CLIPVisionModel, ...) with its "
             "preprocessor_config.json. Needs --text-backbone.")] = None,
    text_backbone: Annotated[Optional[Path], typer.Option(
        help="The text model directory (BERT, DistilBERT, CLIPTextModel, ...) with its tokenizer, for "
             "--image-backbone.")] = None,
    lock_image: Annotated[bool, typer.Option(
        help="Keep the image backbone fixed (locked-image tuning; else it is fine-tuned). Checkpoints then hold no "
             "copy of it, only its path and sha256: it must stay where and as it is.")] = False,
    lock_text: Annotated[bool, typer.Option(help="Keep the text backbone fixed, as --lock-image does.")] = False,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    train_ids: Annotated[Optional[Path], typer.Option(help="File of record ids (one per line): train only on these.")] = None,
    val_data: Annotated[Optional[Path], typer.Option(
        help="A second dataset (any format, read with the same data options) to evaluate on after every epoch: "
             "all of its records, or its --eval-split when that is given.")] = None,
    eval_split: Annotated[Optional[str], typer.Option(
        help="Split evaluated after every epoch: of --val-data when given, else of DATA ('' to skip; default: "
             "val, and no evaluation, said once, when DATA has no val split). A split given here that has no "
             "records is an error.")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 10,
    batch_size: Annotated[int, typer.Option(
        help="Global batch size: the batch of the contrastive loss, split evenly over devices × nodes.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--wd", "--weight-decay", help="Weight decay of weight matrices.")
                            ] = 0.1,
    warmup_steps: Annotated[int, typer.Option("--warmup", "--warmup-steps",
                                              help="Linear warmup steps before cosine decay.")] = 50,
    grad_clip: Annotated[float, typer.Option(help="Max gradient norm (0 disables clipping).")] = 1.0,
    precision: Annotated[str, typer.Option(help="32-true, bf16-mixed, 16-mixed, ...")] = "32-true",
    accelerator: Annotated[str, typer.Option(help="auto, cpu, cuda, mps.")] = "auto",
    devices: Annotated[int, typer.Option(help="Processes (devices) per node.")] = 1,
    num_nodes: Annotated[int, typer.Option(help="Number of nodes.")] = 1,
    strategy: Annotated[str, typer.Option(help="Fabric strategy (auto, ddp, ...).")] = "auto",
    num_workers: Annotated[int, typer.Option("--workers", "--num-workers", help="DataLoader workers per process.")
                           ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of initialization, data order and captions.")] = 0,
    save_every: Annotated[int, typer.Option("--save-frequency", "--save-every", help="Checkpoint every N epochs.")
                          ] = 1,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep the newest N checkpoints (0 keeps all).")] = 0,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out from its newest checkpoint (reading the data with the data options it was "
             "started with; options given must agree with them).")] = False,
    stream: Annotated[bool, typer.Option(
        help="Stream WebDataset shards (whole shards per reader) instead of holding every record in memory; needs at "
             "least devices × num_nodes × max(num_workers, 1) shards.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    on_bad_sample: Annotated[Literal["fail", "skip"], typer.Option(
        help="fail: stop at the first broken row or bad image. skip: decode every train/eval image once up front, "
             "leave out the bad samples and list them in RUN/skipped.csv (cliptrace trak with the same policy "
             "skips the same records).")] = "fail",
) -> None:
    """Train a CLIP model and print where the run was saved."""
    from cliptrace.train import train

    with reported_errors():
        _check_backbone_options(image_backbone, preset, vocab_size)
        if resume:  # a resumed run reads its data as it did; options given must agree with them
            data_options = run_data_options(out, data_options)
        config = TrainConfig(
            data=str(data), out=str(out), model=str(model) if model else None,
            **{name: value for name, value in (("preset", preset), ("vocab_size", vocab_size)) if value is not None},
            image_size=image_size, data_options=data_options,
            image_backbone=str(image_backbone) if image_backbone else None,
            text_backbone=str(text_backbone) if text_backbone else None, lock_image=lock_image, lock_text=lock_text,
            train_split=train_split,
            train_ids=str(train_ids) if train_ids else None, val_data=str(val_data) if val_data else None,
            **_eval_settings(eval_split, val_data is not None), epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, grad_clip=grad_clip or None, precision=precision, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, strategy=strategy, num_workers=num_workers, seed=seed,
            save_every=save_every, keep_checkpoints=keep_checkpoints, progress=progress, on_bad_sample=on_bad_sample,
            stream=stream,
        )
        result = train(config, resume=resume)
    if not result.is_main:
        return
    if result.skipped:
        console.print(Text(result.skipped))
    from cliptrace.evaluate import format_metrics_table

    if result.metrics:
        console.print(format_metrics_table(result.metrics))
    console.print(f"trained in {result.seconds:.0f} s; run saved to [bold]{result.run_dir}[/bold]")
    console.print(f"final model: {result.model_dir}  ({len(result.checkpoints)} checkpoints)")
