"""Model-output functions f(θ; z): the scalar whose per-example gradient TRAK projects, and its loss weight Q.

A model-output function is a small object with two methods:

* :meth:`ModelOutput.output` — f for *one* example (no batch dimension), differentiable in the parameters;
* :meth:`ModelOutput.loss_weight` — Q = −∂loss/∂f for a batch, detached (TRAK's "out-to-loss" term);
* :meth:`ModelOutput.batch_outputs` (optional) — f and Q for a whole batch in one forward pass with the module's own
  parameters, as the factored feature path (:mod:`~cliptrace.trak.factored`) needs.

A model's training objective picks its output (:func:`output_for_objective`): the CLIP margin against a negative
bank for softmax InfoNCE, the pair's logit for SigLIP's sigmoid loss. To add your own, subclass
:class:`ModelOutput`. Every example carries ``index``: its position in the training set, or −1 for an example that
is not a training example (a target).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from cliptrace.objectives import SIGMOID, SOFTMAX, Objective
from cliptrace.trak.batches import concat_batches, map_batch, take_rows
from cliptrace.trak.clip_call import Texts, clip_embed, clip_logit_inputs
from cliptrace.trak.gradients import parameter_fingerprint

Params = Mapping[str, torch.Tensor]
BANK_BATCH = 64  # bank pairs embedded per forward pass


class ModelOutput(abc.ABC):
    """A TRAK model-output function. Batches are tuples (or pytrees) of tensors with a leading batch dim."""

    name: str = "custom"

    @abc.abstractmethod
    def output(self, module: nn.Module, params: Params, example: Any, index: torch.Tensor) -> torch.Tensor:
        """f for one example (inputs without batch dimension); a scalar tensor."""

    @abc.abstractmethod
    def loss_weight(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        """Q = −∂loss/∂f for every example of ``batch``, shape (B,), without gradient."""

    def batch_outputs(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f (B,), Q (B,))`` for a batch, in one forward pass of ``module`` with its own parameters.

        f stays differentiable through the module's activations (per example: f_b depends on example b alone); Q is
        detached. Optional: without it only the exact feature path is available.
        """
        raise NotImplementedError(
            f"{type(self).__name__} defines no batch_outputs(); the factored feature path needs it (use the exact path)"
        )

    def prepare(self, module: nn.Module) -> None:
        """Hook run after a checkpoint is loaded into ``module`` (e.g. to recompute a negative bank)."""

    def settings(self) -> dict[str, Any]:
        """The options that define this function; they are recorded with stored features."""
        return {"name": self.name}


# --- CLIP ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingBank:
    """A fixed set of negatives: embeddings of training pairs under one checkpoint.

    Attributes:
        image_embeddings: (N, D) normalized image embeddings.
        text_embeddings: (N, D) normalized text embeddings.
        indices: (N,) training-set index of each entry; an example never meets itself in the bank.
    """

    image_embeddings: torch.Tensor
    text_embeddings: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device | str) -> EmbeddingBank:
        """The bank on ``device``."""
        return EmbeddingBank(self.image_embeddings.to(device), self.text_embeddings.to(device), self.indices.to(device))


def sample_bank_indices(train_size: int, bank_size: int, seed: int) -> torch.Tensor:
    """``min(bank_size, train_size)`` distinct training indices drawn uniformly with a seeded generator, sorted."""
    if train_size < 1 or bank_size < 1:
        raise ValueError(f"cannot draw a bank of {bank_size} from {train_size} training examples")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(train_size, generator=generator)[: min(bank_size, train_size)].sort().values


@torch.no_grad()
def compute_bank(
    module: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Texts, torch.Tensor]],
) -> EmbeddingBank:
    """Embed ``(images, texts, training indices)`` batches into a bank with the module's current weights."""
    params = dict(module.named_parameters())
    images, texts, indices = [], [], []
    for pixel_values, tokens, index in batches:
        image_embeddings, text_embeddings, _ = clip_embed(module, params, pixel_values, tokens)
        images.append(image_embeddings)
        texts.append(text_embeddings)
        indices.append(torch.as_tensor(index).reshape(-1).to(image_embeddings.device))
    if not images:
        raise ValueError("the negative bank is empty: no training pairs were given")
    return EmbeddingBank(torch.cat(images), torch.cat(texts), torch.cat(indices).long())


class ClipMargin(ModelOutput):
    r"""The symmetric CLIP margin against a fixed, detached negative bank.

    For a pair i with normalized embeddings φ_i (image) and ψ_i (text), multiplier τ = exp(logit_scale) and the bank
    B_i = B \ {i} (the bank without the pair itself)::

        m_img(i) = τ φ_i·ψ_i − logsumexp_{j∈B_i} τ φ_i·ψ_j
        m_txt(i) = τ φ_i·ψ_i − logsumexp_{j∈B_i} τ φ_j·ψ_i
        f_i      = m_img(i) + m_txt(i)

    The bank is constant (no gradient flows into it), so f_i depends on pair i alone: features do not depend on
    the batch size or order. The probability of the correct match against the bank in one direction is
    σ(m) = e^{s_ii} / (e^{s_ii} + Σ_j e^{s_ij}); the loss weight is Q_i = 1 − ½[σ(m_img(i)) + σ(m_txt(i))].

    The bank is drawn uniformly (seeded) from the training set and embedded per checkpoint: call
    :meth:`set_bank_source` once; :meth:`prepare` re-embeds it whenever a checkpoint is loaded.

    Args:
        bank_size: Number of training pairs in the bank (all of them if the set is smaller).
        seed: Seed of the bank draw.
        temperature: A fixed multiplier τ to use instead of the model's ``exp(logit_scale)``.
    """

    name = "clip_margin"

    def __init__(self, bank_size: int = 1024, seed: int = 0, temperature: float | None = None) -> None:
        self.bank_size = bank_size
        self.seed = seed
        self.temperature = temperature
        self.bank: EmbeddingBank | None = None
        self._bank_source: Callable[[torch.Tensor], Iterable[tuple[torch.Tensor, Texts, torch.Tensor]]] | None = None
        self._bank_indices = torch.empty(0, dtype=torch.long)
        self._bank_fingerprint: str | None = None

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "bank_size": self.bank_size, "seed": self.seed, "temperature": self.temperature}

    def set_bank_source(
        self,
        train_size: int,
        batches_for: Callable[[torch.Tensor], Iterable[tuple[torch.Tensor, Texts, torch.Tensor]]],
        indices: torch.Tensor | None = None,
    ) -> None:
        """Tell the output where bank pairs come from.

        Args:
            train_size: Size of the training set.
            batches_for: Given the sorted training indices of the bank, yields ``(images, texts, indices)`` batches.
            indices: The bank's training indices, if already drawn; by default ``bank_size`` of them are drawn
                uniformly with a generator seeded by ``seed``.
        """
        self._bank_source = batches_for
        self._bank_indices = sample_bank_indices(train_size, self.bank_size, self.seed) if indices is None else indices
        self._bank_fingerprint = None

    def bank_indices(self) -> torch.Tensor:
        """The training indices of the bank pairs."""
        if self._bank_source is None:
            raise RuntimeError("ClipMargin has no bank source: call get_embeddings()/set_bank_source() first")
        return self._bank_indices

    def prepare(self, module: nn.Module) -> None:
        """Embed the bank with the weights now in ``module`` (nothing to do if they are the ones it was embedded with)."""
        if self._bank_source is None:
            return
        fingerprint = parameter_fingerprint(module, [name for name, _ in module.named_parameters()])
        if fingerprint != self._bank_fingerprint:
            self.bank = compute_bank(module, self._bank_source(self._bank_indices))
            self._bank_fingerprint = fingerprint

    def get_embeddings(
        self,
        model: nn.Module,
        loader: Iterable,
        batch_size: int = 1,
        embedding_dim: int | None = None,
        size: int = 50_000,
        preprocess_fn_img: Callable[[Any], torch.Tensor] | None = None,
        preprocess_fn_txt: Callable[[Any], Texts] | None = None,
    ) -> None:
        """The ``traker`` entry point: draw a ``size``-pair bank from ``loader`` and embed it with ``model``.

        ``loader`` yields ``(images, texts)`` in training-set order (the order ``featurize`` sees). The bank is a
        uniform sample of all its pairs (reservoir sampling with a generator seeded by ``seed``), so only ``size``
        preprocessed pairs are ever held. ``batch_size`` and ``embedding_dim`` are accepted for compatibility and
        read off the data instead. The bank is re-embedded under every checkpoint the TRAKer loads.
        """
        del batch_size, embedding_dim
        if size < 1:
            raise ValueError(f"the bank size must be positive, got {size}")
        generator = torch.Generator().manual_seed(self.seed)
        slots: list[tuple[int, torch.Tensor, Texts]] = []
        seen = 0
        for x, y in loader:
            images = preprocess_fn_img(x) if preprocess_fn_img else x
            texts = preprocess_fn_txt(y) if preprocess_fn_txt else y
            for row in range(images.shape[0]):
                pair = (seen, images[row : row + 1], take_rows(texts, [row]))
                if seen < size:
                    slots.append(pair)
                else:
                    slot = int(torch.randint(seen + 1, (), generator=generator))
                    if slot < size:
                        slots[slot] = pair
                seen += 1
        slots.sort(key=lambda pair: pair[0])
        self.bank_size = size

        def batches_for(indices: torch.Tensor) -> Iterable[tuple[torch.Tensor, Texts, torch.Tensor]]:
            for start in range(0, len(slots), BANK_BATCH):
                chunk = slots[start : start + BANK_BATCH]
                yield (torch.cat([images for _, images, _ in chunk]), concat_batches([texts for _, _, texts in chunk]),
                       torch.tensor([index for index, _, _ in chunk]))

        self.set_bank_source(seen, batches_for, torch.tensor([index for index, _, _ in slots]))
        self.prepare(model)

    def _outputs(
        self, module: nn.Module, params: Params, images: torch.Tensor, texts: Texts, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, Q)`` of a batch of pairs (see :meth:`SoftmaxObjective.pair_output`)."""
        if self.bank is None:
            raise RuntimeError("ClipMargin has no negative bank: call get_embeddings()/set_bank_source() first")
        image_embeddings, text_embeddings, scale = clip_embed(module, params, images, texts)
        tau = scale if self.temperature is None else torch.as_tensor(self.temperature, dtype=image_embeddings.dtype)
        bank = self.bank.to(image_embeddings.device)
        excluded = indices.reshape(-1, 1) == bank.indices.reshape(1, -1)
        return SOFTMAX.pair_output(image_embeddings, text_embeddings, tau,
                                   bank=(bank.image_embeddings, bank.text_embeddings), excluded=excluded)

    def output(self, module: nn.Module, params: Params, example: Any, index: torch.Tensor) -> torch.Tensor:
        images, texts = example
        batched = map_batch(lambda t: t[None], texts)
        return self._outputs(module, params, images[None], batched, index.reshape(1))[0].sum()

    def batch_outputs(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = batch
        return self._outputs(module, dict(module.named_parameters()), images, texts, indices)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        return self.batch_outputs(module, batch, indices)[1]


# --- SigLIP ---------------------------------------------------------------------------------------------------


class SigmoidPairLogit(ModelOutput):
    r"""The pair's own logit under the sigmoid (SigLIP) objective; it needs no negative bank.

    For a pair i with normalized embeddings φ_i, ψ_i, multiplier t = exp(logit_scale) and logit bias b::

        f_i = t φ_i·ψ_i + b = log(p_i / (1 − p_i)),  p_i = σ(f_i)          Q_i = 1 − σ(f_i)

    The pair's term of the sigmoid loss is ℓ_i = −log σ(f_i), so Q_i = −∂ℓ_i/∂f_i: f is the log-odds of the correct
    answer to "do image i and text i match?", TRAK's model output for a binary decision, and Q the probability the
    model still gives to the wrong answer (see :class:`~cliptrace.objectives.SigmoidObjective`). f depends on pair
    i alone, so features do not depend on the batch size or order.

    The module must have a logit bias: a SigLIP DualEncoder, an HF ``SiglipModel``, or an open_clip-style module
    whose forward returns the bias after the scale.
    """

    name = "sigmoid_pair_logit"

    def _outputs(self, module: nn.Module, params: Params, images: torch.Tensor, texts: Texts
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, Q)`` of a batch of pairs."""
        image_embeddings, text_embeddings, scale, bias = clip_logit_inputs(module, params, images, texts)
        if bias is None:
            raise ValueError(f"{type(module).__name__} has no logit bias: the sigmoid pair logit is SigLIP's output; "
                             "use ClipMargin for a softmax (CLIP) model")
        return SIGMOID.pair_output(image_embeddings, text_embeddings, scale, bias)

    def output(self, module: nn.Module, params: Params, example: Any, index: torch.Tensor) -> torch.Tensor:
        images, texts = example
        return self._outputs(module, params, images[None], map_batch(lambda t: t[None], texts))[0].sum()

    def batch_outputs(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts = batch
        return self._outputs(module, dict(module.named_parameters()), images, texts)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        return self.batch_outputs(module, batch, indices)[1]


def output_for_objective(objective: Objective, bank_size: int = 1024, seed: int = 0) -> ModelOutput:
    """The TRAK model-output function of a training objective: :class:`ClipMargin` for ``softmax`` (with a
    ``bank_size``-pair bank drawn with ``seed``), :class:`SigmoidPairLogit` for ``sigmoid``.

    Raises:
        ValueError: The objective has no registered model output.
    """
    outputs: dict[str, Callable[[], ModelOutput]] = {
        SOFTMAX.name: lambda: ClipMargin(bank_size=bank_size, seed=seed),
        SIGMOID.name: SigmoidPairLogit,
    }
    if objective.name not in outputs:
        raise ValueError(f"objective {objective.name!r} has no TRAK model output; known: {sorted(outputs)}")
    return outputs[objective.name]()


# --- classification -----------------------------------------------------------------------------------------


class ImageClassificationMargin(ModelOutput):
    r"""The multiclass margin of an image classifier (a fine-tuned model or a zero-shot head).

    With logits z = model(x) and label y::

        f = z_y − logsumexp_{c≠y} z_c          Q = 1 − softmax(z / T)_y

    Batches are ``(images, labels)``; the module maps images (B, ...) to logits (B, C).

    Args:
        temperature: T in Q's softmax.
    """

    name = "image_classification_margin"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature}

    def output(self, module: nn.Module, params: Params, example: Any, index: torch.Tensor) -> torch.Tensor:
        images, label = example
        logits = functional_call(module, dict(params), (images[None],), strict=False)
        return classification_margin(logits, label.reshape(1)).sum()

    def batch_outputs(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = module(images)
        probabilities = torch.softmax(logits.detach() / self.temperature, -1)
        return classification_margin(logits, labels), 1 - probabilities.gather(1, labels.reshape(-1, 1)).squeeze(1)

    @torch.no_grad()
    def loss_weight(self, module: nn.Module, batch: Any, indices: torch.Tensor) -> torch.Tensor:
        return self.batch_outputs(module, batch, indices)[1]


def classification_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_y − logsumexp_{c≠y} z_c for logits (B, C) and labels (B,); written with masks so that ``vmap`` can trace it."""
    correct = torch.arange(logits.shape[-1], device=logits.device) == labels.reshape(-1, 1)
    return logits.masked_fill(~correct, 0).sum(-1) - torch.logsumexp(logits.masked_fill(correct, float("-inf")), -1)


def output_for_task(task: str | ModelOutput) -> ModelOutput:
    """A model-output function from a ``traker`` task name (``"clip"``, ``"siglip"``, ``"image_classification"``) or
    an instance."""
    if isinstance(task, ModelOutput):
        return task
    known = {"clip": ClipMargin, "siglip": SigmoidPairLogit, "image_classification": ImageClassificationMargin}
    if task not in known:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(known)} or a ModelOutput instance")
    return known[task]()
