"""The settings of one training run, stored as ``config.json`` in the run directory."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cliptrace.data.options import DataOptions
from cliptrace.data.readers import dataset_path
from cliptrace.data.policy import check_policy
from cliptrace.data.record import DatasetError
from cliptrace.files import file_sha256, write_text_atomic

# Settings that may differ when a run is resumed; every other setting must match the stored run. ``out`` is where
# the run is now, so a run directory may be moved or copied and resumed there.
RESUMABLE_CHANGES = ("epochs", "num_workers", "progress", "out", "eval_required")
# Settings that name files: compared by what they stand for (see TrainConfig.inputs), not by how they are spelled.
PATH_SETTINGS = ("data", "model", "train_ids", "val_data", "image_backbone", "text_backbone")
# Path settings added after the first configs were saved: what older configs record of them is None.
LATER_PATH_SETTINGS = ("val_data", "image_backbone", "text_backbone")
INPUTS = "inputs"  # the key of config.json that records what the paths stood for when it was saved


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    Attributes:
        data: Dataset path in any format :func:`cliptrace.data.load_records` reads.
        out: Run directory (config, logs, checkpoints, final model).
        model: Model directory to start from; None builds a new model from ``preset``, or from ``image_backbone`` and
            ``text_backbone`` when given.
        preset: Size preset of a new model: HF CLIP (:data:`cliptrace.models.PRESETS`) or SigLIP
            (:data:`cliptrace.models.SIGLIP_PRESETS`).
        image_size: Input resolution of a new model; None keeps the preset's.
        image_backbone: A local HuggingFace image model directory (with its ``preprocessor_config.json``): with
            ``text_backbone``, the run trains a :class:`~cliptrace.models.FrozenBackboneDualEncoder` of the two
            backbones (mean pooling, new linear heads) instead of a preset model.
        text_backbone: A local HuggingFace text model directory with its tokenizer; goes with ``image_backbone``.
        lock_image: Keep the image backbone's weights fixed (locked-image tuning, LiT); else it is fine-tuned.
            Checkpoints reference a locked backbone by path and sha256 instead of copying it.
        lock_text: Keep the text backbone's weights fixed.
        vocab_size: Vocabulary size of the BPE tokenizer trained on the training captions of a new model.
        data_options: How ``data`` (and ``val_data``) is read: format, image root, CSV separator, image and caption
            keys (see :class:`~cliptrace.data.options.DataOptions`); a dict of its fields is accepted too.
        train_split: Split to train on.
        train_ids: A UTF-8 file of record ids, one per line: train only on these records of ``train_split`` (a
            subset for counterfactual retraining); None trains on the whole split.
        val_data: A second dataset (any format, read with ``data_options``) whose records are the eval set; None
            evaluates on ``eval_split`` of ``data``.
        eval_split: Split evaluated after every epoch: of ``val_data`` when given (None: every record of it), else
            of ``data`` (None: no evaluation).
        eval_required: An eval split with no records is an error naming the data and the splits it has (set
            by the CLI when ``--eval-split`` or ``--val-data`` is given). When False, an empty eval split of
            ``data`` skips evaluation with one warning (the default ``val`` on a dataset without one).
        epochs: Number of passes over the training split.
        batch_size: Global batch size (split evenly over devices); the last partial batch of an epoch is dropped.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay of matrices (biases, norms, the logit scale and 1-D params get none).
        warmup_steps: Linear warmup steps before the cosine decay to zero.
        grad_clip: Maximum gradient norm; None disables clipping.
        precision: Fabric precision, e.g. "32-true", "bf16-mixed", "16-mixed".
        accelerator: Fabric accelerator: "auto", "cpu", "cuda", "mps".
        devices: Devices (processes) per node.
        num_nodes: Number of nodes.
        strategy: Fabric strategy, e.g. "auto", "ddp".
        num_workers: DataLoader worker processes.
        seed: Seed of initialization, data order and caption choice; the same seed gives the same weights.
        save_every: Save a checkpoint every this many epochs (the last epoch is always saved).
        keep_checkpoints: Keep only the newest N checkpoints; 0 keeps all (attribution ensembles use several).
        cache_images: Keep preprocessed training images in memory.
        progress: Show progress bars.
        on_bad_sample: ``"fail"`` on the first broken row or bad image, or ``"skip"`` them: every image of the train
            and eval records is decoded once up front, and what is skipped is listed in ``RUN/skipped.csv`` (see
            :mod:`cliptrace.data.policy`).
        stream: Stream WebDataset shards instead of holding every record in memory (see
            :mod:`cliptrace.data.stream`): needs at least ``processes × max(num_workers, 1)`` shards, and the
            data order then depends on that product.
    """

    data: str
    out: str
    model: str | None = None
    preset: str = "tiny"
    image_size: int | None = None
    vocab_size: int = 1024
    data_options: DataOptions = field(default_factory=DataOptions)
    train_split: str = "train"
    train_ids: str | None = None
    val_data: str | None = None
    eval_split: str | None = "val"
    eval_required: bool = False
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    num_workers: int = 0
    seed: int = 0
    save_every: int = 1
    keep_checkpoints: int = 0
    cache_images: bool = True
    progress: bool = True
    on_bad_sample: str = "fail"
    stream: bool = False
    image_backbone: str | None = None
    text_backbone: str | None = None
    lock_image: bool = False
    lock_text: bool = False

    def __post_init__(self) -> None:
        self.data_options = DataOptions.from_dict(self.data_options, "data_options")
        positive = ("epochs", "batch_size", "devices", "num_nodes", "save_every", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_policy(self.on_bad_sample)
        if self.stream and self.val_data is not None:
            raise ValueError("stream evaluates on the held-out records of the shards; it takes no val_data")
        if self.stream and (self.train_ids is not None or self.on_bad_sample != "fail"):
            raise ValueError("stream reads shards as they come: it cannot select train_ids or skip bad samples "
                             "(which need every record up front); check the data with `cliptrace data check`")
        self._check_backbones()

    def _check_backbones(self) -> None:
        """Refuse backbone settings that do not go together (each message gives the CLI option too)."""
        if (self.image_backbone is None) != (self.text_backbone is None):
            raise ValueError("image_backbone and text_backbone go together (--image-backbone with --text-backbone): "
                             "a dual encoder of backbones needs one for each tower")
        for tower, lock in (("image", self.lock_image), ("text", self.lock_text)):
            if lock and getattr(self, f"{tower}_backbone") is None:
                raise ValueError(f"lock_{tower} needs {tower}_backbone (--lock-{tower} needs --{tower}-backbone): "
                                 "there is no backbone to lock")
        if self.image_backbone is not None and self.model is not None:
            raise ValueError("model and the backbones exclude each other (--model or --image-backbone/"
                             "--text-backbone): start from a model directory, or build a new model of two backbones")
        if self.image_backbone is not None and self.image_size is not None:
            raise ValueError("image_size does not apply to backbones (--image-size with --image-backbone): the input "
                             "resolution is the image backbone's preprocessor_config.json")

    @property
    def data_format(self) -> str:
        """The dataset format of :attr:`data_options`."""
        return self.data_options.format

    def save(self, path: Path) -> None:
        """Write the config as JSON (atomically), with what its paths stand for now (:meth:`inputs`)."""
        write_text_atomic(path, json.dumps({**dataclasses.asdict(self), INPUTS: self.inputs()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        """Read a config written by :meth:`save`."""
        data = cls._read(path)
        data.pop(INPUTS, None)
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "TrainConfig":
        """The config of a dict of its settings (one from before ``data_options`` keeps its ``data_format``).

        Raises:
            ValueError: ``data`` is not a config's settings; the message starts with ``source``.
        """
        data = dict(data)
        if "data_format" in data and "data_options" not in data:
            data["data_options"] = {"format": data.pop("data_format")}
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{source}: not a readable training config ({error})") from error

    @classmethod
    def load_inputs(cls, path: Path) -> dict[str, str | None] | None:
        """What the paths of a config written by :meth:`save` stood for then; None when it does not say."""
        inputs = cls._read(path).get(INPUTS)
        if isinstance(inputs, dict) and set(PATH_SETTINGS) - set(LATER_PATH_SETTINGS) <= set(inputs):
            inputs = {**dict.fromkeys(LATER_PATH_SETTINGS), **inputs}  # saved before those settings existed
        return inputs if isinstance(inputs, dict) and set(inputs) == set(PATH_SETTINGS) else None

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable training config ({error})") from error
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a readable training config (not a JSON object)")
        return data

    def absolute(self) -> "TrainConfig":
        """This config with its paths (:data:`PATH_SETTINGS` and the image root of ``data_options``) absolute: valid
        from any directory."""
        return dataclasses.replace(
            self, data_options=self.data_options.absolute(),
            **{name: os.path.abspath(getattr(self, name)) for name in PATH_SETTINGS if getattr(self, name)},
        )

    def inputs(self) -> dict[str, str | None]:
        """What the paths of :data:`PATH_SETTINGS` stand for, however they are spelled.

        ``data`` (and ``val_data``) is the dataset file (or shard folder or pattern) that format detection reads, with symlinks and
        relative parts resolved, so a folder and its ``captions.csv`` are the same; ``model`` and the backbones are
        the resolved model directories; ``train_ids`` is the sha256 of the file's contents (its resolved path when
        it cannot be read).
        Relative paths are taken from the current directory.
        """
        train_ids = None
        if self.train_ids is not None:
            try:
                train_ids = "sha256:" + file_sha256(self.train_ids)
            except OSError:
                train_ids = str(Path(self.train_ids).resolve())
        return {
            "data": _dataset_target(self.data, self.data_format),
            "val_data": None if self.val_data is None else _dataset_target(self.val_data, self.data_format),
            "train_ids": train_ids,
            **{name: None if getattr(self, name) is None else str(Path(getattr(self, name)).resolve())
               for name in ("model", "image_backbone", "text_backbone")},
        }

    def differences(self, other: "TrainConfig", other_inputs: dict[str, str | None] | None = None
                    ) -> dict[str, tuple[object, object]]:
        """Settings that differ from ``other`` and may not change on resume, as name -> (self, other).

        Paths are compared by :meth:`inputs` (and reported so), against ``other_inputs`` when given (what
        ``other``'s paths stood for when it was saved, see :meth:`load_inputs`: an ids file edited since then
        differs); :data:`RESUMABLE_CHANGES`, ``out`` among them, are not compared.
        """
        mine, theirs = dataclasses.asdict(self.absolute()), dataclasses.asdict(other.absolute())
        changed = {
            name: (mine[name], theirs[name])
            for name in mine
            if name not in RESUMABLE_CHANGES + PATH_SETTINGS and mine[name] != theirs[name]
        }
        my_inputs, their_inputs = self.inputs(), other_inputs or other.inputs()
        changed.update({
            name: (my_inputs[name], their_inputs[name])
            for name in PATH_SETTINGS
            if my_inputs[name] != their_inputs[name]
        })
        return changed


def _dataset_target(data: str, data_format: str) -> str:
    """The resolved path :func:`cliptrace.data.load_records` reads for ``data`` (``data`` itself when it cannot
    tell: loading the data then reports why)."""
    try:
        path = dataset_path(data, data_format)
    except DatasetError:
        path = Path(data)
    return str(path.resolve())


def run_config(run: str | Path) -> TrainConfig | None:
    """The config of the training run ``run`` (its ``config.json``); None when ``run`` is no training run (no
    ``config.json``, or one of a model directory: HuggingFace's, which names no ``data`` and ``out``).

    Raises:
        ValueError: The run's ``config.json`` is unreadable.
    """
    path = Path(run) / "config.json"
    if not path.is_file() or not {"data", "out"} <= set(TrainConfig._read(path)):
        return None
    return TrainConfig.load(path)


def run_data_options(run: str | Path, given: DataOptions | None = None) -> DataOptions | None:
    """The data options the training run ``run`` was trained with, every option set in ``given`` taking over;
    ``given`` itself when ``run`` is no training run (see :func:`run_config`)."""
    config = run_config(run)
    if config is None:
        return given
    return config.data_options if given is None else config.data_options.overridden_by(given)
