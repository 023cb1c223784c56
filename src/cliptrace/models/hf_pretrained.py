"""Loading a local HuggingFace ``save_pretrained`` directory of a dual-encoder model, checked before any weight is
read: the adapter, the config's model type, safetensors weights of the right shapes, a tokenizer that fits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.base import check_weights_fit
from cliptrace.models.directory import read_manifest, read_preprocessor_config, require_directory
from cliptrace.models.tokenizer import load_tokenizer
from cliptrace.models.weights import safetensors_files, tensor_shapes


def load_hf_pretrained(
    directory: str | Path,
    adapter: str,
    model_class: type[PreTrainedModel],
    default_preprocess: Callable[[PretrainedConfig], ImageTransform],
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ImageTransform]:
    """The model, tokenizer and preprocessing of a local directory holding a ``model_class`` model.

    Never downloads, and never unpickles: the weights must be safetensors. Preprocessing comes from
    ``cliptrace_model.json``, else ``preprocessor_config.json``, else ``default_preprocess(config)``.

    Args:
        directory: The model directory.
        adapter: The adapter name a manifest in it must carry.
        model_class: The HF model class (its ``config_class`` is the config the directory must hold).
        default_preprocess: Preprocessing for a directory that declares none.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ValueError: It holds another adapter's model, its ``config.json`` declares another model type, its weights
            are pickled, unreadable or of another architecture, or its tokenizer is missing or does not fit the text
            tower (see :func:`cliptrace.models.tokenizer.load_tokenizer`).
    """
    directory = require_directory(directory)
    manifest = read_manifest(directory)
    if manifest is not None and manifest["adapter"] != adapter:
        raise ValueError(f"{directory}: holds a {manifest['adapter']} model; load it with load_model")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    config_class = model_class.config_class
    if not isinstance(config, config_class):
        raise ValueError(f"{directory}: config.json has model_type {config.model_type!r}, "
                         f"expected {config_class.model_type!r}")
    files = safetensors_files(directory, getattr(config, "transformers_weights", None))
    found = {name: shape for path in files for name, shape in tensor_shapes(path).items()}
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in model_class(config).state_dict().items()}
    check_weights_fit(expected, found, f"{files[0] if len(files) == 1 else directory} "
                                       f"(config {directory / 'config.json'})")
    tokenizer = load_tokenizer(directory, config.text_config.vocab_size)
    model = model_class.from_pretrained(directory, attn_implementation=attn_implementation, local_files_only=True,
                                        use_safetensors=True)
    preprocess = (
        manifest["preprocess"]
        if manifest is not None
        else read_preprocessor_config(directory) or default_preprocess(config)
    )
    return model, tokenizer, preprocess
