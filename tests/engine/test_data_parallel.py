"""Data-parallel fits: 2 processes (gloo, torch.multiprocessing) give the 1-process basis, spectrum and Fisher."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hf_influence as hfi
from hf_influence._utils import comm
from hf_influence._utils.errors import InvalidInputError
from hf_influence.engine.ihvp.block import block_steps
from tests import utils

EIGENVALUE_RTOL = 1e-6  # 2 processes vs 1, fp64: the same products summed in another order
VECTOR_ATOL = 1e-6  # eigenvectors (each process sums its batches, then the all-reduce adds the two)
RANK, ITERATIONS, BLOCK_SIZE = 8, 24, 4
STOP_TOL = 1e-2  # the Arnoldi fit stops on converged Ritz pairs before ITERATIONS: every process at the same step


def fits(inf: hfi.Influence, train, data_parallel: bool) -> dict[str, torch.Tensor]:
    # a fixed width (BasisConfig.block_size), not one chosen from each run's timings
    block = inf.fit_arnoldi(train, rank=RANK, iterations=ITERATIONS, algorithm="block", block_size=BLOCK_SIZE, tol=0, data_parallel=data_parallel)
    arnoldi = inf.fit_arnoldi(train, rank=RANK, iterations=ITERATIONS, algorithm="arnoldi", tol=STOP_TOL, data_parallel=data_parallel)
    fisher = inf.fit_fisher(train, rank=RANK, data_parallel=data_parallel)
    spectrum = inf.spectrum(train, iterations=10, trace_matvecs=9, data_parallel=data_parallel)
    return {"block_values": block.eigenvalues, "block_vectors": block.eigenvectors, "arnoldi_values": arnoldi.eigenvalues,
            "products": torch.tensor([block.iterations, arnoldi.iterations]),
            "fisher_values": fisher.eigenvalues, "fisher_vectors": fisher.eigenvectors,
            "spectrum": torch.tensor([spectrum.lambda_max, spectrum.lambda_min, spectrum.trace], dtype=torch.float64)}


def make_influence(state_path: str) -> tuple[hfi.Influence, object]:
    model = utils.tiny_bert().double()
    model.load_state_dict(torch.load(state_path))
    # 7 batches of 5 and one of 3: the two processes hold unequal example counts (20 and 18)
    return (hfi.Influence(model.eval(), last_n_layers=1, batch_size=5, hessian_batch_size=5, progress=False),
            utils.classification_dataset(38, seed=3))


def worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        inf, train = make_influence(f"{folder}/model.pt")
        results = fits(inf, train, data_parallel=True)
        results["rank_and_world"] = torch.tensor([comm.rank(), comm.world_size()])
        try:  # every process must pass the same data: the other process's view is named
            inf.fit_arnoldi(train.select(range(30 + rank)), rank=2, iterations=4, data_parallel=True)
            results["refused"] = torch.tensor(0)
        except InvalidInputError as error:
            results["refused"] = torch.tensor(int("rank 0: [5, 5, 5, 5, 5, 5]; rank 1: [5, 5, 5, 5, 5, 5, 1]" in str(error)))
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_parallel")
    torch.manual_seed(0)
    torch.save(utils.tiny_bert().double().state_dict(), folder / "model.pt")
    mp.start_processes(worker, args=(str(folder),), nprocs=2, start_method="spawn", join=True)
    inf, train = make_influence(str(folder / "model.pt"))
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)], fits(inf, train, data_parallel=False)


def test_two_processes_give_the_one_process_basis(two_and_one):
    ranks, single = two_and_one
    for results in ranks:
        assert results["rank_and_world"].tolist()[1] == 2
        for name in ("block_values", "arnoldi_values", "fisher_values", "spectrum"):
            torch.testing.assert_close(results[name], single[name], rtol=EIGENVALUE_RTOL, atol=0, msg=name)
        for name in ("block_vectors", "fisher_vectors"):
            torch.testing.assert_close(results[name], single[name], rtol=0, atol=VECTOR_ATOL, msg=name)
    for name in ("block_values", "block_vectors", "fisher_vectors", "products"):  # every process holds the very same basis
        assert torch.equal(ranks[0][name], ranks[1][name])
    assert ranks[0]["products"].tolist() == single["products"].tolist() and single["products"][1] < ITERATIONS
    assert single["products"][0] == BLOCK_SIZE * block_steps(ITERATIONS, BLOCK_SIZE)  # blocks of block_size, every pass run


def test_processes_with_different_data_are_refused(two_and_one):
    ranks, _ = two_and_one
    assert [int(r["refused"]) for r in ranks] == [1, 1]
