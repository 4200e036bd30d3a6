"""fit_fisher: the exact eigenpairs of the empirical Fisher mean_z g_z g_zᵀ, checked against an explicit F."""

import pytest
import torch

from datasets import concatenate_datasets

import hf_influence as hfi
from hf_influence._utils.errors import InvalidInputError
from hf_influence.engine.ihvp.fisher import held_bytes
from hf_influence.data import PaddingCollator

DAMPING = 0.05


def explicit_fisher_and_grads(model, dataset, names):
    """Independent oracle: per-example gradients by plain autograd, one example at a time, and F = GᵀG / n."""
    named = dict(model.named_parameters())
    rows = []
    for i in range(len(dataset)):
        batch = PaddingCollator()([dataset[i]])
        loss = torch.nn.functional.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [named[n] for n in names])]))
    grads = torch.stack(rows)
    return grads.T @ grads / len(dataset), grads


@pytest.fixture(scope="module")
def fitted(trained_bert):
    model, train, _ = trained_bert
    hessian = train.select(range(12))
    inf = hfi.Influence(model, params=[r"classifier", r"pooler"], damping=DAMPING, batch_size=5, progress=False)
    fisher, grads = explicit_fisher_and_grads(model, hessian, inf.selection.names)
    return inf, hessian, fisher, grads


def test_eigenpairs_equal_the_explicit_fisher(fitted):
    inf, hessian, fisher, _ = fitted
    basis = inf.fit_fisher(hessian, rank=6)
    values, vectors = torch.linalg.eigh(fisher)
    top = values.argsort(descending=True)[:6]
    torch.testing.assert_close(basis.eigenvalues, values[top], rtol=1e-8, atol=1e-12)
    alignment = (basis.eigenvectors @ vectors[:, top]).abs().diagonal()  # eigenvalues are distinct: unit |cos|
    torch.testing.assert_close(alignment, torch.ones(6, dtype=alignment.dtype), rtol=0, atol=1e-8)
    assert (basis.curvature, basis.iterations, basis.rank) == ("fisher", 0, 6)


def test_full_rank_self_influence_is_the_damped_fisher_inverse(fitted):
    """With every nonzero eigenpair kept (rank = examples), each Hessian example's gradient lies in the
    basis' span, so its self-influence is exactly g_zᵀ (F + λI)⁻¹ g_z."""
    inf, hessian, fisher, grads = fitted
    basis = inf.fit_fisher(hessian, rank=len(hessian))
    eye = torch.eye(fisher.shape[0], dtype=fisher.dtype)
    expected = (grads * torch.linalg.solve(fisher + DAMPING * eye, grads.T).T).sum(1)
    ours = inf.self_influence(hessian, method="arnoldi", basis=basis)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-10)


def test_over_the_memory_budget_block_krylov_on_fisher_products_finds_the_same_eigenpairs(fitted):
    """The 12 rows five times (the same F): holding 60 × P gradients for the SVD (~0.45 MiB) is over a 0.3 MiB budget
    that the streamed fit fits in (its Krylov vectors grow with the rank, not the rows): F V from gradient passes."""
    inf, hessian, fisher, _ = fitted
    rows = concatenate_datasets([hessian] * 5)
    small = hfi.Influence(inf.model, params=[r"classifier", r"pooler"], damping=DAMPING, batch_size=5, progress=False, memory_budget_gb=3e-4)
    assert held_bytes(len(rows), small.selection.num_params, 8) > small.memory_budget
    assert small.estimate_cost("fit_fisher", rows, rank=6).grads.startswith("formed per Hessian batch, streamed")
    basis = small.fit_fisher(rows, rank=6)
    values, vectors = torch.linalg.eigh(fisher)
    top = values.argsort(descending=True)[:6]
    torch.testing.assert_close(basis.eigenvalues, values[top], rtol=1e-4, atol=1e-12)
    alignment = (basis.eigenvectors @ vectors[:, top]).abs().diagonal()
    torch.testing.assert_close(alignment, torch.ones(6, dtype=alignment.dtype), rtol=0, atol=1e-4)
    assert basis.curvature == "fisher" and basis.iterations > 0  # Fisher products spent


def test_save_load_keeps_the_curvature(fitted, tmp_path):
    inf, hessian, _, _ = fitted
    inf.fit_fisher(hessian, rank=3).save(tmp_path)
    assert hfi.ArnoldiBasis.load(tmp_path).curvature == "fisher"


def test_refusals_say_what_to_change(fitted):
    inf, hessian, _, _ = fitted
    with pytest.raises(InvalidInputError, match="exceeds the 12 Hessian examples"):
        inf.fit_fisher(hessian, rank=13)
    with pytest.raises(InvalidInputError, match="curvature must be one of"):
        inf.fit_basis(hessian, rank=2, curvature="kfac")


def test_fit_basis_dispatches_on_the_curvature(fitted):
    inf, hessian, _, _ = fitted
    fisher = inf.fit_basis(hessian, rank=3, curvature="fisher")
    torch.testing.assert_close(fisher.eigenvalues, inf.fit_fisher(hessian, rank=3).eigenvalues, rtol=0, atol=0)
    assert fisher.curvature == "fisher" and inf.fit_basis(hessian, rank=3, iterations=6).curvature == "hessian"


def test_trainer_fits_the_fisher_when_asked(trained_bert, tmp_path):
    model, train, _ = trained_bert
    args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True,
                                          influence_params=["classifier", "pooler"], influence_rank=4, influence_iterations=8,
                                          influence_hessian_examples=12, influence_curvature="fisher", influence_damping=DAMPING)
    trainer = hfi.InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=PaddingCollator())
    basis = trainer.fit_influence()
    expected = trainer.get_influence().fit_fisher(trainer.get_influence_dataloader(trainer.get_hessian_dataset()), rank=4)
    assert basis.curvature == "fisher"
    torch.testing.assert_close(basis.eigenvalues, expected.eigenvalues, rtol=1e-10, atol=0)
    trainer.args.influence_curvature = "hessian"  # a Fisher basis on disk is not reused for the Hessian
    assert trainer._reusable_basis(tmp_path / "influence") is None
    with pytest.raises(InvalidInputError, match="influence_curvature must be one of"):
        hfi.InfluenceTrainingArguments(output_dir="x", influence_curvature="ggn", report_to="none")
