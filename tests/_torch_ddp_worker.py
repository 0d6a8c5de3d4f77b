"""One rank of the ``torch.distributed`` scenarios of ``tests/test_torch_module.py``.

    python tests/_torch_ddp_worker.py RANK WORLD_SIZE PORT OUT_DIR

Joins a gloo process group on 127.0.0.1:PORT, runs every scenario on this rank's
shard of the data (:func:`shard`), and saves what it got to ``OUT_DIR/rank{RANK}.pt``.
The test recomputes the truth in one process on the concatenated batches.

Scenarios:

* ``init/<name>``: the first training forward of a bare ``ActNorm``, shards of
  unequal sizes (one of them empty in ``empty-shard``), ranks 4 and 5, biased and
  unbiased: the initial ``loc`` and ``scale`` each rank ends with.
* ``ddp``: ``Conv2d -> ActNorm -> LeakyReLU(0.2, True) -> Conv2d`` wrapped in
  ``DistributedDataParallel``, its SGD optimizer built before the first forward,
  trained for :data:`DDP_STEPS` steps on 2 examples per rank: the final state dict.
"""

import faulthandler
import os
import sys

import torch

CHANNELS = 3
# name -> (per-rank shard sizes, example shape without the batch, unbiased)
INIT_SCENARIOS = {
    "unequal": ((3, 2), (CHANNELS, 4, 5), False),
    "unbiased": ((3, 2), (CHANNELS, 4, 5), True),
    "empty-shard": ((4, 0), (CHANNELS, 4, 5), False),
    "video": ((1, 2), (CHANNELS, 2, 3, 4), False),
}
DDP_STEPS = 3
DDP_PER_RANK = 2


def shard(seed, sizes, example_shape, rank):
    """Rank ``rank``'s shard of a global batch (float32, per-channel offsets/scales)."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn((sum(sizes), *example_shape), generator=gen)
    channel = [1, -1] + [1] * (len(example_shape) - 1)
    data = data * torch.tensor([2.0, 0.5, 1.0]).reshape(channel) + torch.tensor(
        [3.0, -1.0, 0.5]).reshape(channel)
    start = sum(sizes[:rank])
    return data[start:start + sizes[rank]]


def ddp_model():
    """The model every rank (and the single-process truth) builds: same seed, same weights."""
    from tf_actnorm.torch import ActNorm

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(CHANNELS, 4, 3, padding=1), ActNorm(4),
        torch.nn.LeakyReLU(0.2, True), torch.nn.Conv2d(4, 1, 3, padding=1))


def ddp_batch(step, rank, world_size):
    """Rank ``rank``'s share of step ``step``'s global batch."""
    return shard(100 + step, (DDP_PER_RANK,) * world_size, (CHANNELS, 6, 6), rank)


def main():
    rank, world_size, port, out_dir = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                       sys.argv[4])
    # Were a collective to wait forever, say where and exit before the test's deadline.
    faulthandler.dump_traceback_later(60, exit=True)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tf_actnorm.torch import ActNorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        results = {}
        for seed, (name, (sizes, example_shape, unbiased)) in enumerate(INIT_SCENARIOS.items()):
            norm = ActNorm(CHANNELS, unbiased=unbiased)
            norm(shard(seed, sizes, example_shape, rank))
            results[f"init/{name}"] = {k: v.clone() for k, v in norm.state_dict().items()}

        model = ddp_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # before the first forward
        ddp = DistributedDataParallel(model)
        for step in range(DDP_STEPS):
            loss = ddp(ddp_batch(step, rank, world_size)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results["ddp"] = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp
        dist.barrier()  # both ranks are done with every collective
    finally:
        dist.destroy_process_group()
    print("OK", flush=True)


if __name__ == "__main__":
    # As in an environment with PyTorch only: `tf_actnorm.torch` must need neither Keras
    # nor TensorFlow (and the workers start faster without them).
    sys.modules["keras"] = None
    sys.modules["tensorflow"] = None
    main()
    # Exit without the interpreter's teardown: a gloo/DDP destructor run there can wait
    # for a peer that has already exited.
    os._exit(0)
