"""Process group, rank and device of a run, the few collectives the trainer uses, and FSDP2.

    torchrun --standalone --nproc_per_node 8 train.py --phase hybrid ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each worker's environment. Only then does
setup() start a process group: gloo on CPU, nccl on CUDA, with each worker on cuda:LOCAL_RANK.
Without those variables the run is a single process, and every helper here returns its input
without calling torch.distributed.
"""

import datetime
import gc
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Dist:
    """Rank, world size and device of this process; rank 0 of world size 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """A process group exists (torchrun started this process)."""
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """This process writes files, logs and shows the progress bar."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """Return this rank's contiguous part of range(n); ranks below n % world_size get one more."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def sum(self, values: list[float]) -> list[float]:
        """Sum each number over the ranks, in float64."""
        return self.all_reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Take the maximum of each number over the ranks."""
        return self.all_reduce(values, dist.ReduceOp.MAX)

    def all_reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def gather(self, items: list) -> list:
        """Concatenate each rank's list of picklable items in rank order, on every rank."""
        if not self.enabled:
            return list(items)
        parts = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def broadcast(self, value):
        """Return rank 0's picklable `value` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for collectives live: nccl needs CUDA tensors, gloo takes CPU tensors."""
        return self.device if self.enabled and dist.get_backend() == "nccl" else torch.device("cpu")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def setup(device_name: str) -> Dist:
    """Choose the device from --device and, under torchrun, start the process group.

    Under torchrun, --device cuda or auto puts each worker on cuda:LOCAL_RANK, so a process uses
    one GPU; a --device with an index is rejected there, because every worker would take it.
    """
    if not launched_by_torchrun():
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        return Dist(device=torch.device(device_name))

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    requested = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                             "cpu" if device_name == "auto" else device_name)
    if requested.type == "cuda":
        if requested.index is not None:
            sys.exit(f"error: --device {device_name}: under torchrun each worker uses cuda:LOCAL_RANK; "
                     "pass --device cuda")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = requested, "gloo"
    # NOTE: the other ranks wait in a collective while rank 0 writes a checkpoint or the outputs.
    # torch's default timeout is 30 minutes (torch.distributed.constants.default_pg_timeout in
    # 2.13); an hour is a guess that leaves room for the checkpoints of large models.
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(hours=1))
    return Dist(rank, world_size, local_rank, device)


def teardown(ctx: Dist):
    """Destroy the process group. Call it after the last reference to a DistributedDataParallel
    module is gone.

    Otherwise DDP's reducer holds the last reference to the group and destroys it while Python
    frees the reducer, with the GIL held. With gloo in torch 2.13 that deadlocked at exit in 3 of 17
    runs stopped by SIGTERM on 2 CPU processes: the destructor waited for a gloo thread, which
    waited for the GIL.
    """
    if ctx.enabled and dist.is_initialized():
        gc.collect()  # frees a DDP module that only a reference cycle still reaches
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# FSDP2: each transformer block, and the root module, shards its weights, gradients and
# optimizer state over the processes.


def shard_model(model, dtype: str):
    """Apply FSDP2's fully_shard to each transformer block of `model`, then to the whole model
    (embeddings, final norm, LM head), in place. With dtype "bfloat16", the gathered weights are
    bfloat16 for the forward pass, and gradients are reduced and kept in float32."""
    policy = MixedPrecisionPolicy()
    if dtype == "bfloat16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def full_weights(model):
    """Keep an FSDP2 model's weights gathered inside the block, so that each process may run a
    different number of forward passes there, as generation does. Other models pass through.
    Every process must enter the block, since gathering is a collective."""
    if not is_sharded(model):
        yield model
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
        model.set_reshard_after_forward(True)


def full_state_dict(model, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Return the whole model's weights, gathered from an FSDP2 model (a collective). With
    `rank0_only` they are CPU tensors on rank 0 and an empty dict elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=options)


def full_optimizer_state(model, optimizer) -> dict:
    """Return optimizer.state_dict() as one process would have it, parameters numbered in the
    order of model.parameters(), gathered from FSDP2 shards on rank 0 (empty elsewhere)."""
    gathered = get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not gathered:
        return {}
    index = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {"state": {index[name]: values for name, values in gathered["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in gathered["param_groups"]]}


def load_full_optimizer_state(model, optimizer, saved: dict):
    """Load a state of full_optimizer_state, which every process has, into the FSDP2 shards."""
    names = [name for name, _ in model.named_parameters()]
    by_name = {"state": {names[int(i)]: values for i, values in saved["state"].items()},
               "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
