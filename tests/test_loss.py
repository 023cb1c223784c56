"""The contrastive loss against a brute-force loop, and the 2-process gathered loss against one process."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliptrace.train.loss import contrastive_loss


def brute_force_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """½·mean over pairs of the image→text and text→image cross-entropies, one pair at a time."""
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(images[i] @ texts[j]) for j in range(n)]
        col = [scale * float(texts[i] @ images[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


@pytest.mark.parametrize("n, dim, scale", [(1, 4, 1.0), (5, 8, 14.3), (9, 3, 100.0)])
def test_loss_equals_brute_force(n: int, dim: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(n)
    images = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(n, dim, generator=generator, dtype=torch.float64), dim=-1)
    loss = contrastive_loss(images, texts, torch.tensor(scale, dtype=torch.float64))
    assert loss.item() == pytest.approx(brute_force_loss(images, texts, scale), rel=1e-12)


def test_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        contrastive_loss(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs_image = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    inputs_text = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    return inputs_image, inputs_text, weight


def _loss_and_grad(inputs_image, inputs_text, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """A shared linear tower, so gradients flow through the gathered features of every rank."""
    weight = weight.clone().requires_grad_(True)
    loss = contrastive_loss(
        F.normalize(inputs_image @ weight, dim=-1),
        F.normalize(inputs_text @ weight, dim=-1),
        torch.tensor(3.0, dtype=torch.float64),
    )
    loss.backward()
    return loss.detach(), weight.grad


def _rank_worker(rank: int, world: int, port: int, result_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        inputs_image, inputs_text, weight = _global_batch()
        rows = slice(rank * 4, rank * 4 + 4)
        loss, grad = _loss_and_grad(inputs_image[rows], inputs_text[rows], weight)
        dist.all_reduce(loss)  # data-parallel training averages the per-rank losses and gradients
        dist.all_reduce(grad)
        if rank == 0:
            torch.save((loss / world, grad / world), result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gathered_loss_equals_single_process(tmp_path) -> None:
    result_path = str(tmp_path / "rank0.pt")
    mp.start_processes(_rank_worker, args=(2, _free_port(), result_path), nprocs=2, start_method="spawn")
    distributed_loss, distributed_grad = torch.load(result_path)
    single_loss, single_grad = _loss_and_grad(*_global_batch())
    assert distributed_loss.item() == pytest.approx(single_loss.item(), rel=1e-12)
    torch.testing.assert_close(distributed_grad, single_grad, rtol=1e-10, atol=1e-12)
