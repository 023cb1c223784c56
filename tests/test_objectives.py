"""The objectives against brute-force loops and autograd, their 2-process gathered losses against one process, and
the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliptrace.objectives import (
    OBJECTIVES,
    SIGMOID,
    SOFTMAX,
    Objective,
    SigmoidObjective,
    get_objective,
    register_objective,
    sigmoid_loss,
)
from test_loss import _free_port, _global_batch  # the harness of the softmax loss's 2-process test


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def brute_force_sigmoid_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, bias: float) -> float:
    """−(1/N) Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)), one pair at a time (Zhai et al. 2023, eq. 1)."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total -= _log_sigmoid(z * (scale * float(images[i] @ texts[j]) + bias))
    return total / n


def _unit(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    return images, texts


@pytest.mark.parametrize("n, dim, scale, bias", [(1, 4, 1.0, 0.0), (5, 8, 10.0, -10.0), (9, 3, 117.0, 3.5)])
def test_sigmoid_loss_equals_brute_force(n: int, dim: int, scale: float, bias: float) -> None:
    images, texts = _unit(n, dim, n)
    scale_tensor, bias_tensor = torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    loss = sigmoid_loss(images, texts, scale_tensor, bias_tensor)
    assert loss.item() == pytest.approx(brute_force_sigmoid_loss(images, texts, scale, bias), rel=1e-12)
    assert SIGMOID.loss(images, texts, scale_tensor, bias_tensor).item() == loss.item()


def test_losses_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        sigmoid_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="sigmoid objective needs the model's logit bias"):
        SIGMOID.loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="softmax objective has no logit bias"):
        SOFTMAX.loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match="needs a bank of negatives"):
        SOFTMAX.pair_output(torch.zeros(2, 4), torch.zeros(2, 4), 1.0)


def test_sigmoid_pair_output_is_the_log_odds_and_q_is_minus_the_loss_derivative() -> None:
    images, texts = _unit(6, 5, 3)
    scale, bias = 7.5, -2.0
    f, q = SIGMOID.pair_output(images, texts, scale, bias)
    assert not q.requires_grad
    for i in range(6):
        p = 1 / (1 + math.exp(-(scale * float(images[i] @ texts[i]) + bias)))  # σ of the pair's own logit
        assert float(f[i]) == pytest.approx(math.log(p / (1 - p)), rel=1e-10, abs=1e-10)
        value = f[i].detach().clone().requires_grad_(True)
        own_term = -F.logsigmoid(value)  # the pair's positive term of the sigmoid loss, as a function of f
        (derivative,) = torch.autograd.grad(own_term, value)
        assert float(q[i]) == pytest.approx(-float(derivative), rel=1e-12)


def test_softmax_pair_output_equals_a_loop_over_the_bank() -> None:
    images, texts = _unit(3, 4, 1)
    bank_images, bank_texts = _unit(5, 4, 2)
    tau = 4.0
    excluded = torch.zeros(3, 5, dtype=torch.bool)
    excluded[1, 2] = True
    f, q = SOFTMAX.pair_output(images, texts, tau, bank=(bank_images, bank_texts), excluded=excluded)
    for i in range(3):
        keep = [k for k in range(5) if not excluded[i, k]]
        positive = tau * float(images[i] @ texts[i])
        to_texts = math.log(sum(math.exp(tau * float(images[i] @ bank_texts[k])) for k in keep))
        to_images = math.log(sum(math.exp(tau * float(bank_images[k] @ texts[i])) for k in keep))
        margins = (positive - to_texts, positive - to_images)
        assert float(f[i]) == pytest.approx(sum(margins), rel=1e-12)
        assert float(q[i]) == pytest.approx(1 - sum(1 / (1 + math.exp(-m)) for m in margins) / 2, rel=1e-12)


def test_logits_and_probabilities() -> None:
    images, texts = _unit(3, 4, 5)
    logits = SIGMOID.logits(images, texts, 2.0, -1.0)
    for i in range(3):
        for j in range(3):
            assert float(logits[i, j]) == pytest.approx(2.0 * float(images[i] @ texts[j]) - 1.0, rel=1e-12)
    torch.testing.assert_close(SIGMOID.pair_logits(images, texts, 2.0, -1.0), logits.diagonal())
    torch.testing.assert_close(SIGMOID.probabilities(logits), 1 / (1 + torch.exp(-logits)))
    softmax = SOFTMAX.probabilities(SOFTMAX.logits(images, texts, 2.0))
    torch.testing.assert_close(softmax.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(softmax.argmax(-1), (images @ texts.T).argmax(-1))


def test_registry() -> None:
    assert get_objective("softmax") is SOFTMAX and get_objective("sigmoid") is SIGMOID
    assert set(OBJECTIVES) >= {"softmax", "sigmoid"}
    assert register_objective(SIGMOID) is SIGMOID  # registering the same object again is harmless
    with pytest.raises(ValueError, match="already registered"):
        register_objective(SigmoidObjective())
    with pytest.raises(ValueError, match=r"unknown objective 'hinge'; known: .*'sigmoid'"):
        get_objective("hinge")
    assert isinstance(SOFTMAX, Objective) and not SOFTMAX.has_bias and SIGMOID.has_bias and not SIGMOID.uses_bank


# --- 2 processes against one ----------------------------------------------------------------------------------


def _loss_and_grads(objective: Objective, inputs_image, inputs_text, weight) -> tuple[torch.Tensor, ...]:
    """A shared linear tower, so gradients flow through the gathered features of every rank; the scale and the
    bias (for the sigmoid objective) are trained too."""
    weight = weight.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    loss = objective.loss(F.normalize(inputs_image @ weight, dim=-1), F.normalize(inputs_text @ weight, dim=-1),
                          log_scale.exp(), bias if objective.has_bias else None)
    loss.backward()
    bias_grad = bias.grad if objective.has_bias else torch.zeros((), dtype=torch.float64)
    return loss.detach(), weight.grad, log_scale.grad, bias_grad


def _rank_worker(rank: int, world: int, port: int, name: str, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs_image, inputs_text, weight = _global_batch()
        share = 8 // world
        rows = slice(rank * share, (rank + 1) * share)
        results = _loss_and_grads(get_objective(name), inputs_image[rows], inputs_text[rows], weight)
        for value in results:  # data-parallel training averages the per-rank losses and gradients
            dist.all_reduce(value)
        if rank == 0:
            torch.save([value / world for value in results], result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["sigmoid", "softmax"])
def test_two_process_gathered_loss_equals_single_process(name: str, tmp_path) -> None:
    result_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_worker, args=(2, _free_port(), name, result_path), nprocs=2, start_method="spawn")
    distributed = torch.load(result_path)
    single = _loss_and_grads(get_objective(name), *_global_batch())
    assert distributed[0].item() == pytest.approx(single[0].item(), rel=1e-12)
    for got, expected in zip(distributed[1:], single[1:]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if name == "sigmoid":
        assert single[3].abs() > 0  # the bias is trained through the gathered loss
