"""Two gloo processes on the CPU: the U-MAE loss and DDP gradients equal one process on the
concatenated batch (the U-MAE reference's gather would give the uniformity term 1/2 the weight); the
uniformity family's terms in both gather modes (`global` equal, `reference` half)."""
import os
import socket
import subprocess
import sys

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from umae_plugin import distributed
from umae_plugin.losses import coding_rate_loss, uniformity_loss
from umae_plugin.models_umae import UMAEViT

KW = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
BATCH, LAMBDA = 6, 0.5


class FixedNoiseUMAE(UMAEViT):
    """Masks drawn from `self.noise` so that each rank's masks equal its slice of the full batch's."""

    def random_masking(self, x, mask_ratio, noise=None):  # the model's own `noise` argument, if any, is ignored
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


# ---------------------------------------------------------------------------------------------
# the uniformity family's gather modes: `global` is exact on any number of ranks, `reference` (the
# U-MAE / M-MAE code's gather) gives the term 1/world_size of that gradient


TERMS = {
    "square": lambda f, gather: uniformity_loss(f, gather=gather),
    "tcr": lambda f, gather: coding_rate_loss(f, mu=3.0, gather=gather),
    "tcr_centred": lambda f, gather: coding_rate_loss(f, mu=3.0, centering=True, gather=gather),
}


def term_inputs():
    return torch.randn(BATCH, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def term_encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(7, 5).double()


def term_grads(model, x, term, gather):
    """Gradients of the encoder's parameters for `term` of its features of `x`."""
    model.zero_grad()
    loss = TERMS[term](model(x), gather)
    loss.backward()
    params = getattr(model, "module", model).named_parameters()
    return loss.detach(), {n: p.grad.clone() for n, p in params}


def term_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = term_inputs()[rank * BATCH // world:(rank + 1) * BATCH // world]
        model = DistributedDataParallel(term_encoder())  # averages the parameters' gradients over ranks
        results = {(term, mode): term_grads(model, x, term, mode) for term in TERMS for mode in distributed.GATHER_MODES}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_terms(tmp_path_factory):
    out = tmp_path_factory.mktemp("terms") / "rank0.pt"
    mp.spawn(term_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("term", list(TERMS))
def test_global_gather_equals_one_process(two_rank_terms, term):
    loss, grads = two_rank_terms[(term, "global")]
    single_loss, single = term_grads(term_encoder(), term_inputs(), term, True)
    torch.testing.assert_close(loss, single_loss, rtol=1e-10, atol=0)
    for name in single:
        torch.testing.assert_close(grads[name], single[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("term", list(TERMS))
def test_reference_gather_gives_one_over_world_size(two_rank_terms, term):
    loss, grads = two_rank_terms[(term, "reference")]
    single_loss, single = term_grads(term_encoder(), term_inputs(), term, True)
    torch.testing.assert_close(loss, single_loss, rtol=1e-10, atol=0)  # the same value, forward
    for name in single:
        torch.testing.assert_close(grads[name], single[name] / 2, rtol=1e-6, atol=0, msg=name)


def test_gather_modes_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    for mode in distributed.GATHER_MODES:
        assert distributed.gather_features(x, mode) is x
    with pytest.raises(ValueError, match="unknown gather mode"):
        distributed.gather_features(x, "local")


def test_single_process_helpers():
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    x = torch.randn(3, 2)
    assert distributed.all_gather_with_grad(x) is x
    launch = distributed.init_distributed()
    assert launch.world_size == 1 and not distributed.is_enabled()


# ---------------------------------------------------------------------------------------------
# launch paths: the reference's init_distributed_mode (torchrun env, --dist_on_itp, SLURM_PROCID)


def test_launcher_environment_wins_and_names_the_ignored_flags():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "OMPI_COMM_WORLD_RANK": "0", "SLURM_PROCID": "5"}
    launch = distributed.resolve_launch(env, dist_url="tcp://h:1", world_size=4, dist_on_itp=True)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.init_method) == (3, 8, 1, "env://")
    assert launch.ignored == ("--dist_on_itp", "--dist_url tcp://h:1", "--world_size 4")
    # the launcher's own values (submitit writes WORLD_SIZE into args) and the defaults are not "ignored"
    assert distributed.resolve_launch(env, world_size=8).ignored == ()
    assert distributed.resolve_launch(env).ignored == ()


def test_dist_on_itp_reads_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
    launch = distributed.resolve_launch(env, dist_on_itp=True)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.init_method) == (5, 16, 1, "tcp://node7:29500")
    with pytest.raises(distributed.LaunchError, match="MASTER_PORT"):
        distributed.resolve_launch({k: v for k, v in env.items() if k != "MASTER_PORT"}, dist_on_itp=True)
    assert distributed.resolve_launch(env).world_size == 1  # without the flag OpenMPI's variables mean nothing


def test_slurm_procid_with_world_size_and_dist_url():
    env = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    launch = distributed.resolve_launch(env, dist_url="tcp://n1:23456", world_size=4)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.init_method) == (2, 4, 0, "tcp://n1:23456")
    with pytest.raises(distributed.LaunchError, match="MASTER_ADDR"):
        distributed.resolve_launch(env, world_size=4)  # env:// with nothing to rendezvous at
    with pytest.raises(distributed.LaunchError, match="not below --world_size"):
        distributed.resolve_launch({"SLURM_PROCID": "4"}, dist_url="tcp://n1:1", world_size=4)
    assert distributed.resolve_launch(env).world_size == 1  # one task under sbatch: a single process
    with pytest.raises(distributed.LaunchError, match="4 tasks"):  # srun -n 4 without a world size
        distributed.resolve_launch({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "4"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOIN = """
import torch, torch.distributed as dist
from umae_plugin import distributed
launch = distributed.init_distributed(backend="gloo", dist_url={url!r}, world_size={world}, dist_on_itp={itp})
t = torch.tensor([float(distributed.get_rank())])
dist.all_reduce(t)
print(distributed.get_rank(), distributed.get_world_size(), distributed.get_local_rank(), int(t.item()), flush=True)
distributed.shutdown()
"""


@pytest.mark.parametrize("path", ["slurm", "itp"])
def test_upstream_launch_paths_form_a_real_group(path):
    """Two processes join through the flags alone (no torchrun): ranks 0 and 1 all-reduce 0 + 1."""
    port = _free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "OMPI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    procs = []
    for rank in range(2):
        env = dict(base)
        if path == "slurm":
            env.update(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
            code = JOIN.format(url=f"tcp://127.0.0.1:{port}", world=2, itp=False)
        else:
            env.update(OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            code = JOIN.format(url="env://", world=1, itp=True)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sorted(out.split() for out, _ in outs) == [["0", "2", "0", "1"], ["1", "2", "1", "1"]]


def test_wrap_ddp_in_one_process_is_the_model_itself():
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model
