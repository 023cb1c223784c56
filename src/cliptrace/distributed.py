"""The processes of a distributed job: which shard of the work this one does, and waiting for the others.

Jobs are launched by Lightning Fabric (``--devices N --num-nodes M``), which starts the local processes itself, or
joins those that ``torchrun`` or SLURM started (it reads their environment). Anything with ``global_rank``,
``world_size`` and ``barrier()`` serves as :class:`Ranks`, a :class:`lightning.fabric.Fabric` among them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lightning.fabric import Fabric


class Ranks(Protocol):
    """The view of a distributed job that sharded work needs."""

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def barrier(self) -> None: ...


def shard_of(ranks: Ranks | None) -> tuple[int, int] | None:
    """``(rank, world size)``: this process's shard of the work; None for a single process."""
    return (ranks.global_rank, ranks.world_size) if ranks is not None and ranks.world_size > 1 else None


def is_main(ranks: Ranks | None) -> bool:
    """Whether this process is rank 0 (or the only one): the one that finalizes, scores and prints."""
    return ranks is None or ranks.global_rank == 0


def barrier(ranks: Ranks | None) -> None:
    """Wait until every process of the job gets here (nothing to wait for in a single process)."""
    if ranks is not None and ranks.world_size > 1:
        ranks.barrier()


def launch(device: str, devices: int = 1, num_nodes: int = 1) -> Fabric | None:
    """Start (or join) a data-parallel job of ``devices`` processes on each of ``num_nodes`` nodes.

    Args:
        device: ``cpu``, ``cuda`` or ``mps``: the kind of device each process uses.
        devices: Processes per node.
        num_nodes: Nodes.

    Returns:
        The launched :class:`~lightning.fabric.Fabric` (its ``device`` is this process's device), or None when the
        job is a single process.
    """
    if devices < 1 or num_nodes < 1:
        raise ValueError(f"devices and num_nodes must be at least 1, got {devices} and {num_nodes}")
    if devices == 1 and num_nodes == 1:
        return None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=device.split(":")[0], devices=devices, num_nodes=num_nodes, strategy="ddp")
    fabric.launch()
    return fabric
