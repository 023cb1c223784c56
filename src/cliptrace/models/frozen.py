"""A dual encoder of two frozen HuggingFace backbones with trainable projection heads (LiT / multilingual-CLIP).

``transformers.VisionTextDualEncoderModel`` is not used: it embeds ``pooler_output``, which DistilBERT does not
have, which is a 4-D map for ResNet, and which for BERT/ViT is a randomly initialized dense layer whenever a
checkpoint lacks pooler weights. Pooling here is parameter-free instead:

* image: the mean of the backbone's last hidden state over all positions (patch tokens and class token for
  transformers, the spatial grid for convolutional nets — for ResNet exactly its global average pool);
* text: the mean of the last hidden state over the tokens the attention mask keeps (as multilingual-CLIP).

Each pooled vector goes through a bias-free linear head into the joint space. Only the heads and the logit
scale train; both backbones have ``requires_grad=False`` and stay in eval mode even after ``.train()``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from cliptrace.data.transforms import ImageTransform
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
from cliptrace.models.weights import read_tensors, safetensors_files, tensor_shapes

HEADS_NAME = "heads.safetensors"
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07


class FrozenBackboneDualEncoder(DualEncoder):
    """Frozen vision and text backbones, mean-pooled, with trainable linear heads and logit scale.

    Attributes:
        vision: The frozen image backbone (any HF model whose output has ``last_hidden_state``).
        text: The frozen text backbone.
        visual_projection: Trainable head, backbone width -> ``projection_dim``.
        text_projection: Trainable head, backbone width -> ``projection_dim``.
        log_scale: Trainable log inverse temperature (exposed as ``logit_scale``).
        tokenizer: The text backbone's tokenizer.
        preprocess: PIL image -> normalized tensor.
        context_length: Token sequence length.
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
    ) -> None:
        super().__init__()
        self.vision = vision.requires_grad_(False).eval()
        self.text = text.requires_grad_(False).eval()
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
            return cls(
                vision, text, tokenizer, preprocess, projection_dim=projection_dim, context_length=context_length
            )

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
    ) -> FrozenBackboneDualEncoder:
        """Pretrained backbones from local HF directories, with freshly initialized heads. Never downloads.

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
        vision = _load_backbone(vision_directory, attn_implementation)
        text = _load_backbone(text_directory, attn_implementation)
        tokenizer = tokenizer or load_tokenizer(text_directory, getattr(text.config, "vocab_size", None))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(
                vision, text, tokenizer, preprocess, projection_dim=projection_dim, context_length=context_length
            )

    @classmethod
    def load(cls, directory: str | Path, attn_implementation: str | None = None) -> FrozenBackboneDualEncoder:
        """Load a directory written by :meth:`save`.

        Raises:
            FileNotFoundError: ``directory`` or its ``vision/`` or ``text/`` does not exist.
            ValueError: It is not a frozen dual encoder directory, a backbone's weights are pickled or unreadable,
                ``text/`` has no usable tokenizer, or ``heads.safetensors`` is unreadable or does not fit.
        """
        directory = require_directory(directory)
        manifest = read_manifest(directory)
        if manifest is None or manifest["adapter"] != "frozen_dual_encoder":
            raise ValueError(f"{directory}: not a frozen_dual_encoder model directory")
        heads_path = directory / HEADS_NAME
        if not heads_path.is_file():
            raise FileNotFoundError(f"{heads_path}: the trained heads are missing")
        heads = read_tensors(heads_path)
        vision = _load_backbone(directory / "vision", attn_implementation)
        text = _load_backbone(directory / "text", attn_implementation)
        tokenizer = load_tokenizer(directory / "text", getattr(text.config, "vocab_size", None))
        with torch.random.fork_rng(devices=[]):  # the heads' initialization is overwritten below
            model = cls(vision, text, tokenizer, manifest["preprocess"], projection_dim=manifest["projection_dim"],
                        context_length=manifest["context_length"])
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()
                    if not name.startswith(("vision.", "text."))}
        check_weights_fit(expected, {name: tuple(tensor.shape) for name, tensor in heads.items()},
                          f"{heads_path} (projection_dim {manifest['projection_dim']} in {directory / MANIFEST_NAME})")
        model.load_state_dict({name: heads[name] for name in expected}, strict=False)
        return model

    def train(self, mode: bool = True) -> FrozenBackboneDualEncoder:
        """Set the heads' training mode; the backbones stay in eval mode."""
        super().train(mode)
        self.vision.eval()
        self.text.eval()
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

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to (B, context_length) ``input_ids`` and ``attention_mask``."""
        return tokenize(self.tokenizer, texts, self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The trainable log inverse temperature."""
        return self.log_scale

    def save(self, directory: str | Path) -> None:
        """Write ``vision/`` and ``text/`` (HF model directories, the tokenizer in ``text/``), the heads and
        logit scale as ``heads.safetensors``, and the manifest."""
        directory = Path(directory)
        self.vision.save_pretrained(directory / "vision")
        self.text.save_pretrained(directory / "text")
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
        )


def _load_backbone(directory: Path, attn_implementation: str | None) -> PreTrainedModel:
    """An HF base model from a local directory, never downloading and never unpickling.

    Raises:
        ValueError: The weights are pickled, missing, or not readable safetensors (naming the file).
    """
    directory = require_directory(directory)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    for path in safetensors_files(directory, getattr(config, "transformers_weights", None)):
        tensor_shapes(path)  # reading the header refuses a truncated or corrupt file, naming it
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return AutoModel.from_pretrained(directory, local_files_only=True, use_safetensors=True, **options)


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
