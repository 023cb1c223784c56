"""A dual encoder of two HuggingFace backbones with trainable projection heads (LiT / multilingual-CLIP).

``transformers.VisionTextDualEncoderModel`` is not used: it embeds ``pooler_output``, which DistilBERT does not
have, which is a 4-D map for ResNet, and which for BERT/ViT is a randomly initialized dense layer whenever a
checkpoint lacks pooler weights. Pooling here is parameter-free instead:

* image: the mean of the backbone's last hidden state over all positions (patch tokens and class token for
  transformers, the spatial grid for convolutional nets — for ResNet exactly its global average pool);
* text: the mean of the last hidden state over the tokens the attention mask keeps (as multilingual-CLIP).

Each pooled vector goes through a bias-free linear head into the joint space. The heads and the logit scale
train; each backbone is either locked (``requires_grad=False``, in eval mode even after ``.train()``: locked-image
tuning locks the image tower) or fine-tuned with them.

A locked backbone loaded from a local directory is saved by reference (see
:mod:`cliptrace.models.backbone_reference`): its path and file digests go into the manifest, not its weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.backbone_reference import BackboneReference
from cliptrace.models.base import DualEncoder, check_weights_fit
from cliptrace.models.base import normalize as l2_normalize
from cliptrace.models.directory import (
    MANIFEST_NAME,
    read_manifest,
    read_preprocessor_config,
    require_directory,
    write_manifest,
)
from cliptrace.models.tokenizer import load_tokenizer, tokenize
from cliptrace.models.towers.base import ImageTower, TextTower
from cliptrace.models.towers.hf_backbones import image_backbone_tower, text_backbone_tower
from cliptrace.models.weights import read_tensors, safetensors_files, tensor_shapes

HEADS_NAME = "heads.safetensors"
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
TOWERS = {"image": "vision", "text": "text"}  # tower -> the attribute (and subdirectory) holding its backbone
# Modules a backbone applies only to its own pooled output, which the mean pooling here never reads
OFF_PATH_MODULES = ("pooler", "post_layernorm")  # BERT, ViT, ResNet, ...; CLIPVisionModel
MISSING_WEIGHTS_SEED = 0  # initializes weights a backbone directory lacks, so that every load gives the same ones


class FrozenBackboneDualEncoder(DualEncoder):
    """Vision and text backbones, mean-pooled, each locked or fine-tuned, with trainable linear heads and logit scale.

    Attributes:
        vision: The image backbone (any HF model whose output has ``last_hidden_state``).
        text: The text backbone.
        visual_projection: Trainable head, backbone width -> ``projection_dim``.
        text_projection: Trainable head, backbone width -> ``projection_dim``.
        log_scale: Trainable log inverse temperature (exposed as ``logit_scale``).
        tokenizer: The text backbone's tokenizer.
        preprocess: PIL image -> normalized tensor.
        context_length: Token sequence length.
        locked: Tower (``"image"``, ``"text"``) -> whether its backbone is locked.
        references: Tower -> where its locked backbone was loaded from, for the towers saved by reference.
    """

    def __init__(
        self,
        vision: PreTrainedModel,
        text: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        preprocess: ImageTransform,
        *,
        projection_dim: int = 512,
        context_length: int | None = None,
        lock_image: bool = True,
        lock_text: bool = True,
    ) -> None:
        super().__init__()
        self.locked = {"image": lock_image, "text": lock_text}
        self.references: dict[str, BackboneReference] = {}
        self.vision = vision.requires_grad_(not lock_image).train(not lock_image)
        self.text = text.requires_grad_(not lock_text).train(not lock_text)
        for backbone in (self.vision, self.text):
            _freeze_off_path(backbone)
        self.visual_projection = nn.Linear(_width(vision.config), projection_dim, bias=False)
        self.text_projection = nn.Linear(_width(text.config), projection_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.context_length = context_length or _default_context_length(tokenizer, text.config)

    @classmethod
    def from_configs(
        cls,
        vision_config: PretrainedConfig,
        text_config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase,
        *,
        preprocess: ImageTransform | None = None,
        projection_dim: int = 512,
        context_length: int | None = None,
        seed: int | None = None,
        lock_image: bool = True,
        lock_text: bool = True,
    ) -> FrozenBackboneDualEncoder:
        """Randomly initialized backbones built from HF configs (e.g. ``ResNetConfig`` + ``DistilBertConfig``).

        Args:
            vision_config: Config of the image backbone.
            text_config: Config of the text backbone; its vocabulary must cover ``tokenizer``'s.
            tokenizer: Tokenizer of the text backbone.
            preprocess: Image preprocessing; by default OpenAI CLIP's at ``vision_config.image_size``.
            projection_dim: Joint embedding width.
            context_length: Token sequence length; by default the smaller of the tokenizer's and the text
                backbone's maximum.
            seed: Seeds the initialization without touching the global random state.
            lock_image: Lock the image backbone (else it trains with the heads).
            lock_text: Lock the text backbone.

        Raises:
            ValueError: No ``preprocess`` and the vision config has no ``image_size``.
        """
        if preprocess is None:
            size = getattr(vision_config, "image_size", None)
            if not isinstance(size, int):
                raise ValueError(
                    f"vision_config ({type(vision_config).__name__}) has no integer image_size: pass preprocess="
                )
            preprocess = ImageTransform(size)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            vision = AutoModel.from_config(vision_config)
            text = AutoModel.from_config(text_config)
            return cls(vision, text, tokenizer, preprocess, projection_dim=projection_dim,
                       context_length=context_length, lock_image=lock_image, lock_text=lock_text)

    @classmethod
    def from_pretrained(
        cls,
        vision_directory: str | Path,
        text_directory: str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        preprocess: ImageTransform | None = None,
        projection_dim: int = 512,
        context_length: int | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
        lock_image: bool = True,
        lock_text: bool = True,
    ) -> FrozenBackboneDualEncoder:
        """Pretrained backbones from local HF directories, with freshly initialized heads. Never downloads.

        A locked backbone is saved by reference to its directory (see :meth:`save`), which must then stay as it is.

        Args:
            vision_directory: A local image model directory (e.g. a downloaded ``google/vit-base-patch16-224``).
            text_directory: A local text model directory with its tokenizer (e.g. a downloaded
                ``distilbert-base-multilingual-cased``).
            tokenizer: Overrides the tokenizer found in ``text_directory``.
            preprocess: Overrides the ``preprocessor_config.json`` of ``vision_directory``.
            projection_dim: Joint embedding width.
            context_length: Token sequence length; by default the smaller of the tokenizer's and the text
                backbone's maximum.
            attn_implementation: Attention kernel of both backbones (e.g. ``"eager"``); HF's default if None.
            seed: Seeds the head initialization without touching the global random state.
            lock_image: Lock the image backbone (locked-image tuning); else it is fine-tuned with the heads.
            lock_text: Lock the text backbone.

        Raises:
            FileNotFoundError: A directory does not exist.
            ValueError: No ``preprocess`` given and ``vision_directory`` has no ``preprocessor_config.json``; a
                backbone's weights are pickled or unreadable; or no ``tokenizer`` is given and ``text_directory``
                has no usable one.
        """
        vision_directory, text_directory = require_directory(vision_directory), require_directory(text_directory)
        preprocess = preprocess or read_preprocessor_config(vision_directory)
        if preprocess is None:
            raise ValueError(f"{vision_directory}: no preprocessor_config.json; pass preprocess=ImageTransform(...)")
        directories = {"image": vision_directory, "text": text_directory}
        locked = {"image": lock_image, "text": lock_text}
        references = {tower: BackboneReference.of(directory, _backbone_files(directory))
                      for tower, directory in directories.items() if locked[tower]}
        vision = _load_backbone(vision_directory, attn_implementation)
        text = _load_backbone(text_directory, attn_implementation)
        tokenizer = tokenizer or load_tokenizer(text_directory, getattr(text.config, "vocab_size", None))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(vision, text, tokenizer, preprocess, projection_dim=projection_dim,
                        context_length=context_length, lock_image=lock_image, lock_text=lock_text)
        model.references = references
        return model

    @classmethod
    def load(cls, directory: str | Path, attn_implementation: str | None = None) -> FrozenBackboneDualEncoder:
        """Load a directory written by :meth:`save` (or by a cliptrace from before backbones could be unlocked or
        referenced: both are then locked and stored in the directory).

        Raises:
            FileNotFoundError: ``directory`` or a stored backbone's ``vision/`` or ``text/`` does not exist.
            BackboneChangedError: A referenced backbone is missing or changed since the directory was saved.
            ValueError: It is not a frozen dual encoder directory, its ``towers`` entry is malformed, a backbone's
                weights are pickled or unreadable, ``text/`` has no usable tokenizer, or ``heads.safetensors`` is
                unreadable or does not fit.
        """
        directory = require_directory(directory)
        manifest = read_manifest(directory)
        if manifest is None or manifest["adapter"] != "frozen_dual_encoder":
            raise ValueError(f"{directory}: not a frozen_dual_encoder model directory")
        heads_path = directory / HEADS_NAME
        if not heads_path.is_file():
            raise FileNotFoundError(f"{heads_path}: the trained heads are missing")
        heads = read_tensors(heads_path)
        towers = _read_towers(manifest, directory)
        backbones = {}
        for tower, (_, reference) in towers.items():
            if reference is not None:
                reference.check(directory, tower)
            backbones[tower] = _load_backbone(reference.path if reference else directory / TOWERS[tower],
                                              attn_implementation)
        tokenizer = load_tokenizer(directory / "text", getattr(backbones["text"].config, "vocab_size", None))
        with torch.random.fork_rng(devices=[]):  # the heads' initialization is overwritten below
            model = cls(backbones["image"], backbones["text"], tokenizer, manifest["preprocess"],
                        projection_dim=manifest["projection_dim"], context_length=manifest["context_length"],
                        lock_image=towers["image"][0], lock_text=towers["text"][0])
        model.references = {tower: reference for tower, (_, reference) in towers.items() if reference is not None}
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
                    if not name.startswith(("vision.", "text."))}
        check_weights_fit(expected, {name: tuple(tensor.shape) for name, tensor in heads.items()},
                          f"{heads_path} (projection_dim {manifest['projection_dim']} in {directory / MANIFEST_NAME})")
        model.load_state_dict({name: heads[name] for name in expected}, strict=False)
        return model

    def train(self, mode: bool = True) -> FrozenBackboneDualEncoder:
        """Set the training mode of the heads and of the backbones not locked; locked backbones stay in eval mode."""
        super().train(mode)
        for tower, attribute in TOWERS.items():
            if self.locked[tower]:
                getattr(self, attribute).eval()
        return self

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images (B, 3, H, W) into (B, D)."""
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
        return l2_normalize(self.visual_projection(pooled.to(self.visual_projection.weight.dtype)), normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed tokenized texts (B, L) into (B, D)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return l2_normalize(self.text_projection(pooled.to(self.text_projection.weight.dtype)), normalize)

    def image_tower(self) -> ImageTower:
        """The image backbone and head as a described tower (:mod:`cliptrace.models.towers.hf_backbones`).

        Raises:
            TowerUnavailable: The backbone is not a ``ViTModel`` or ``CLIPVisionModel``.
        """
        return image_backbone_tower(self.vision, self.visual_projection)

    def text_tower(self) -> TextTower:
        """The text backbone and head as a described tower.

        Raises:
            TowerUnavailable: The backbone is not a ``BertModel``, ``DistilBertModel`` or ``CLIPTextModel``.
        """
        return text_backbone_tower(self.text, self.text_projection, self.tokenizer)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to (B, context_length) ``input_ids`` and ``attention_mask``."""
        return tokenize(self.tokenizer, texts, self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The trainable log inverse temperature."""
        return self.log_scale

    def save(self, directory: str | Path) -> None:
        """Write the backbones to ``vision/`` and ``text/`` (HF model directories), the tokenizer to ``text/``, the
        heads and logit scale as ``heads.safetensors``, and the manifest.

        A locked backbone with a reference (one :meth:`from_pretrained` loaded) is not written: the manifest's
        ``towers`` entry records its path and file digests instead. It is assumed unchanged since it was loaded.
        """
        directory = Path(directory)
        towers: dict[str, dict[str, Any]] = {}
        for tower, attribute in TOWERS.items():
            reference = self.references.get(tower) if self.locked[tower] else None
            if reference is None:
                getattr(self, attribute).save_pretrained(directory / attribute)
            towers[tower] = {"locked": self.locked[tower], **({"backbone": reference.to_dict()} if reference else {})}
        self.tokenizer.save_pretrained(directory / "text")
        heads = {
            name: tensor.detach().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith(("vision.", "text."))
        }
        save_file(heads, directory / HEADS_NAME)
        write_manifest(
            directory,
            "frozen_dual_encoder",
            self.preprocess,
            self.context_length,
            projection_dim=self.visual_projection.out_features,
            towers=towers,
        )


def _backbone_files(directory: Path) -> list[Path]:
    """The files that define a local HF model: ``config.json`` and its safetensors weight files.

    Raises:
        ValueError: The weights are pickled or missing, or the config does not load (naming the file).
    """
    directory = require_directory(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return [directory / "config.json", *safetensors_files(directory, getattr(config, "transformers_weights", None))]


def _load_backbone(directory: Path, attn_implementation: str | None) -> PreTrainedModel:
    """An HF base model from a local directory, never downloading and never unpickling.

    Weights the directory lacks (e.g. a pooler never used here) are initialized from a fixed seed, so every load of
    the same directory gives the same model.

    Raises:
        ValueError: The weights are pickled, missing, or not readable safetensors (naming the file).
    """
    for path in _backbone_files(directory)[1:]:
        tensor_shapes(path)  # reading the header refuses a truncated or corrupt file, naming it
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MISSING_WEIGHTS_SEED)
        return AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True, **options)


def _read_towers(manifest: dict[str, Any], directory: Path) -> dict[str, tuple[bool, BackboneReference | None]]:
    """Tower -> (locked, reference or None when stored in the directory) from a manifest's ``towers`` entry; a
    manifest without one (written before backbones could be unlocked or referenced) has both locked and stored.

    Raises:
        ValueError: The entry is malformed (naming the manifest).
    """
    source = str(directory / MANIFEST_NAME)
    towers = manifest.get("towers", {tower: {"locked": True} for tower in TOWERS})
    if not (isinstance(towers, dict) and set(towers) == set(TOWERS)
            and all(isinstance(entry, dict) and isinstance(entry.get("locked"), bool) for entry in towers.values())):
        raise ValueError(f"{source}: key 'towers' must map 'image' and 'text' to {{'locked': true|false, "
                         f"'backbone': ...}} (got {towers!r})")
    read = {}
    for tower, entry in towers.items():
        reference = None if "backbone" not in entry else BackboneReference.from_dict(entry["backbone"], source)
        if reference is not None and not entry["locked"]:
            raise ValueError(f"{source}: the {tower} tower is not locked, so its backbone must be stored, not "
                             "referenced")
        read[tower] = (entry["locked"], reference)
    return read


def _freeze_off_path(backbone: PreTrainedModel) -> None:
    """Freeze the backbone's :data:`OFF_PATH_MODULES`: they never reach an embedding, so their parameters would get
    no gradient (DDP refuses such parameters; TRAK's per-layer kernels and EK-FAC cannot fit them)."""
    for name in OFF_PATH_MODULES:
        try:
            backbone.get_submodule(name).requires_grad_(False)
        except AttributeError:  # no such module (or None: a model built without its pooler)
            continue


def _width(config: PretrainedConfig) -> int:
    """The feature width of a backbone's last hidden state."""
    if isinstance(getattr(config, "hidden_size", None), int):
        return config.hidden_size
    if getattr(config, "hidden_sizes", None):
        return config.hidden_sizes[-1]
    raise ValueError(f"{type(config).__name__} has neither hidden_size nor hidden_sizes: cannot size the head")


def _default_context_length(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The smaller of the tokenizer's and the text backbone's maximum sequence length."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    limits = [limit for limit in limits if isinstance(limit, int) and limit < 1_000_000]
    if not limits:
        raise ValueError(f"cannot tell the maximum sequence length of {type(config).__name__}: pass context_length=")
    return min(limits)
