"""Two gloo processes on the CPU: the U-MAE loss and DDP gradients equal one process on the
concatenated batch (the U-MAE reference's gather would give the uniformity term 1/2 the weight)."""
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from umae_plugin import distributed
from umae_plugin.models_umae import UMAEViT

KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
BATCH, LAMBDA = 6, 0.5


class FixedNoiseUMAE(UMAEViT):
    """Masks drawn from `self.noise` so that each rank's masks equal its slice of the full batch's."""

    def random_masking(self, x, mask_ratio):
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.argsort(self.noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.rand(BATCH, 16, generator=g)


def build():
    torch.manual_seed(0)
    return FixedNoiseUMAE(**KW, lambda_unif=LAMBDA)


def run_step(model, imgs, noise):
    getattr(model, "module", model).noise = noise
    loss, _, _, terms = model(imgs, 0.75, return_terms=True)
    loss.backward()
    return loss.detach(), terms["loss_unif"].detach()


def worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        imgs, noise = inputs()
        sl = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        model = DistributedDataParallel(build())
        loss, loss_unif = run_step(model, imgs[sl], noise[sl])
        loss_mean = distributed.all_reduce_mean(loss)
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"loss": loss_mean, "loss_unif": loss_unif, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)

    imgs, noise = inputs()
    single = build()
    loss, loss_unif = run_step(single, imgs, noise)
    torch.testing.assert_close(got["loss_unif"], loss_unif)
    torch.testing.assert_close(got["loss"], loss)
    for name, p in single.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_single_process_helpers():
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    x = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(x) is x
    assert distributed.init_distributed() is False
