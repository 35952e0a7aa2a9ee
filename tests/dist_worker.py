"""Worker for the 2-process (gloo, CPU) distributed tests: DDP, FSDP2 (fully_shard) and ZeroRedundancyOptimizer
training with rmsprop_gpu.RMSprop; rank 0 saves the final full parameters for the parent to compare."""

import datetime
import faulthandler
import os
import sys
import warnings

import torch
import torch.distributed as dist


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)


OPT = dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)
STEPS = 4


def single_process(backend: str) -> list[torch.Tensor]:
    """The reference: the same training on the full batch in one process."""
    import rmsprop_gpu

    model = make_model()
    opt = rmsprop_gpu.RMSprop(model.parameters(), backend=backend, **OPT)
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank: int, world: int, mode: str, backend: str, port: str, out: str):
    faulthandler.dump_traceback_later(60, exit=True)  # a hung worker says where it hangs, then exits
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    import rmsprop_gpu

    if backend == "cupy":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tools.cuda_cpu.cpu_module import cpu_module_factory

        rmsprop_gpu.backends.BACKENDS["cupy"].use_module_factory(cpu_module_factory)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only, whatever the hostname resolves to
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a stuck collective fails, not hangs
    model = make_model()
    x, y = data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # each rank gets half of the batch
    if mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = rmsprop_gpu.RMSprop(net.parameters(), backend=backend, **OPT)
    elif mode == "ddp_in_backward":  # DDP's comm hook all-reduces each bucket, then steps its params
        net = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)  # several buckets
        opt = rmsprop_gpu.RMSprop(net.parameters(), backend=backend, in_backward=True, **OPT)
        opt.attach_ddp(net)
    elif mode == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        net = torch.nn.parallel.DistributedDataParallel(model)
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=rmsprop_gpu.RMSprop, backend=backend, **OPT)
    elif mode in ("fsdp2", "fsdp2_in_backward"):  # in_backward: each shard updated when its grad is reduced
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        opt = rmsprop_gpu.RMSprop(net.parameters(), backend=backend, in_backward=mode == "fsdp2_in_backward",
                                  bucket_mb=1e-4, **OPT)  # several buckets
        assert all(type(p).__name__ == "DTensor" for p in net.parameters())
    else:
        raise ValueError(mode)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # in_backward: "step() does nothing"
            opt.step()
    if mode in ("ddp_in_backward", "fsdp2_in_backward"):
        assert opt._in_backward.buckets >= STEPS, opt._in_backward.buckets  # the hooks stepped
    if mode == "fsdp2_in_backward":
        assert all(p.grad is None for p in net.parameters())  # released as soon as their shard was stepped
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    if rank == 0:
        torch.save([p.detach().clone() for p in params], out)
    dist.barrier()
    # gloo's teardown (destroy_process_group) hung about one run in fifteen here after rank 0 had left;
    # everything is saved and synchronized at this point, so leave without it
    sys.stdout.flush()
    os._exit(0)


def launch(mode: str, backend: str, out: str, timeout: float = 90.0) -> None:
    """Two ranks as plain processes on loopback; raises if either fails or runs past the timeout."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), mode, backend, str(port), out]) for r in range(2)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    if any(codes):
        raise RuntimeError(f"{mode}/{backend}: ranks exited with {codes}")


if __name__ == "__main__":
    rank, mode, backend, port, out = sys.argv[1:6]
    worker(int(rank), 2, mode, backend, port, out)
