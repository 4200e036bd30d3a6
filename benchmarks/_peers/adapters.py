"""Each peer library on a `Problem`, its damping and score scale converted to ours.

Conventions converted (ours: ``g_testᵀ (H + λI)^-1 g_train``, ``H`` = Hessian of the mean training loss):

- **captum** (``ArnoldiInfluenceFunction``, ``NaiveInfluenceFunction``): its Hessian is that of the
  *summed* loss over ``hessian_dataset`` (batch losses with ``reduction="none"`` are summed), i.e.
  ``N_h · H``, and ``hessian_reg`` is added to that. So ``hessian_reg = N_h · λ`` and captum's scores
  are ours divided by ``N_h``; we multiply them back.
- **dattri** (``IFAttributorArnoldi``, ``IFAttributorExplicit``, ``IFAttributorLiSSA``): the Hessian is
  that of the loss function we give it (the mean cross-entropy over the cached batch), and
  ``regularization`` is additive: ``regularization = λ``. Its LiSSA iterates
  ``h ← v + (1 - d) h - H_B h / s`` and returns ``h / s``, whose fixed point is ``(H + d·s I)^-1 v``:
  ``damping d = λ / s`` (FastIF's convention). Its explicit/LiSSA attributors sum one inverse per
  cached batch, so the whole Hessian set is cached as one batch. Its HVPs, called with the model's
  parameters (which require grad), keep every HVP's autograd graph alive (the Arnoldi basis of 60
  iterations over 128 padded pairs ran a 24 GB machine out of memory); the adapters call dattri
  under ``torch.no_grad()``, which ``torch.func`` transforms inside it ignore.
- **kronfluence** (EK-FAC): curvature factors are averages over examples (the mean-loss scale) and
  ``damping_factor`` is added to the eigenvalue-corrected diagonal: ``damping_factor = λ``. It tracks
  ``nn.Linear`` / ``nn.Conv2d`` modules only, so its parameter set must be whole Linear modules.
"""

from __future__ import annotations

import copy
import tempfile
import torch
import torch.nn.functional as F
from datasets import Dataset

from .common import LogitsModel, Problem, as_tensors, mean_loss, owning_modules, tuple_loader


# ----------------------------------------------------------------------------- captum
def _no_checkpoint(model, path) -> float:
    """captum wants a checkpoint path; the model already holds the weights, so loading is a no-op."""
    return 1.0


def _captum_kwargs(problem: Problem, train: Dataset, hessian: Dataset) -> dict:
    wrapper = LogitsModel(problem.model)
    layers = ["model." + name for name in owning_modules(problem.model, problem.param_names)]
    return dict(model=wrapper, train_dataset=tuple_loader(train, problem.batch_size), checkpoint="in-memory",
                checkpoints_load_func=_no_checkpoint, layers=layers, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"),
                hessian_dataset=tuple_loader(hessian, problem.batch_size))


def captum_arnoldi(problem: Problem, train: Dataset, hessian: Dataset, rank: int, iterations: int, seed: int = 0):
    """captum's ``ArnoldiInfluenceFunction`` (fits its basis in ``__init__``); λ converted to ``hessian_reg = N_h·λ``."""
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    return ArnoldiInfluenceFunction(**_captum_kwargs(problem, train, hessian), projection_dim=rank, arnoldi_dim=iterations,
                                    hessian_reg=len(hessian) * problem.damping, seed=seed, projection_on_cpu=True)


def captum_naive(problem: Problem, train: Dataset, hessian: Dataset):
    """captum's ``NaiveInfluenceFunction``: the explicit Hessian, every eigenpair kept (exact)."""
    from captum.influence import NaiveInfluenceFunction

    return NaiveInfluenceFunction(**_captum_kwargs(problem, train, hessian), projection_dim=problem.num_params,
                                  hessian_reg=len(hessian) * problem.damping, hessian_inverse_tol=0.0)


def captum_self_influence(function, hessian: Dataset) -> torch.Tensor:
    """Self-influence of captum's training data, in our scale: ``[N]``."""
    return function.self_influence(None, show_progress=False).detach() * len(hessian)


def captum_scores(function, test: Dataset, hessian: Dataset) -> torch.Tensor:
    """``[n_test, n_train]`` scores of captum's training data on ``test``, in our scale."""
    inputs = as_tensors(test)
    return function.influence(inputs, k=None, show_progress=False).detach() * len(hessian)


# ----------------------------------------------------------------------------- dattri
def dattri_task(problem: Problem):
    """A dattri ``AttributionTask`` whose loss is the mean cross-entropy of a batch (4-D masks, so vmap runs)."""
    from dattri.task import AttributionTask

    model = problem.model

    def loss(params, data):
        return mean_loss(model, params, data)

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def _whole(dataset: Dataset):
    """The dataset as one cached batch (dattri's explicit/LiSSA attributors sum one inverse per batch)."""
    return tuple_loader(dataset, len(dataset))


def dattri_arnoldi(problem: Problem, hessian: Dataset, rank: int, iterations: int, seed: int = 0):
    """dattri's ``IFAttributorArnoldi``, fitted (``cache``) on ``hessian``; ``iterations`` HVPs like ours and captum's."""
    from dattri.algorithm.influence_function import IFAttributorArnoldi

    attributor = IFAttributorArnoldi(dattri_task(problem), layer_name=list(problem.param_names), device="cpu",
                                     proj_dim=rank, max_iter=iterations + 1, regularization=problem.damping, seed=seed)
    attributor.cache(_whole(hessian))
    with torch.no_grad():  # dattri runs the iteration lazily, at the first projection: run it here, in the fit
        attributor.arnoldi_projectors[0](torch.zeros(1, problem.num_params, dtype=_dtype(problem)))
    return attributor


def _dtype(problem: Problem) -> torch.dtype:
    return next(problem.model.parameters()).dtype


def dattri_explicit(problem: Problem, hessian: Dataset):
    """dattri's ``IFAttributorExplicit`` (explicit Hessian of the mean loss over ``hessian``)."""
    from dattri.algorithm.influence_function import IFAttributorExplicit

    attributor = IFAttributorExplicit(dattri_task(problem), layer_name=list(problem.param_names), device="cpu",
                                      regularization=problem.damping)
    attributor.cache(_whole(hessian))
    return attributor


def dattri_self_influence(attributor, train: Dataset, batch_size: int) -> torch.Tensor:
    """Self-influence ``[N]``, one ``self_attribute`` call per chunk of ``batch_size`` rows.

    dattri 0.3.0's ``self_attribute`` is correct only for a loader of one batch: with several, it
    re-transforms every batch once per batch (quadratic work) and then fails adding a batch-sized
    result to the N-sized output. Chunking calls its own code once per chunk, linear in N.
    """
    chunks = [train.select(range(start, min(start + batch_size, len(train)))) for start in range(0, len(train), batch_size)]
    with torch.no_grad():
        return torch.cat([attributor.self_attribute(tuple_loader(chunk, len(chunk))).detach() for chunk in chunks])


def dattri_scores(attributor, test: Dataset, train: Dataset, batch_size: int) -> torch.Tensor:
    """``[n_test, n_train]`` (dattri returns ``[n_train, n_test]``)."""
    with torch.no_grad():
        return attributor.attribute(tuple_loader(train, batch_size), tuple_loader(test, batch_size)).detach().T


def dattri_lissa_s_test(problem: Problem, test: Dataset, hessian: Dataset, batch_size: int, scale: float, steps: int,
                        repeats: int = 1) -> torch.Tensor:
    """dattri's ``IFAttributorLiSSA`` s_test ``[n_test, P]`` at our λ (``damping = λ / scale``)."""
    from dattri.algorithm.influence_function import IFAttributorLiSSA

    attributor = IFAttributorLiSSA(dattri_task(problem), layer_name=list(problem.param_names), device="cpu",
                                   batch_size=batch_size, num_repeat=repeats, recursion_depth=steps,
                                   damping=problem.damping / scale, scaling=scale, mode="rev-rev")
    attributor.cache(_whole(hessian))
    data = tuple(t.unsqueeze(0) for t in as_tensors(test))
    with torch.no_grad():
        g_test = attributor.generate_test_rep(0, data)  # [n_test, P]
        return attributor.transform_test_rep(0, g_test).detach()


# ----------------------------------------------------------------------------- kronfluence
def _kronfluence_task(modules: list[str]):
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Summed cross-entropy of a batch (kronfluence's convention); sampled labels for the true Fisher."""

        def compute_train_loss(self, batch, model, sample=False):
            logits = _logits(model, batch)
            if not sample:
                return F.cross_entropy(logits, batch["labels"], reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            return F.cross_entropy(_logits(model, batch), batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):
            return modules

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return ClassificationTask()


def _logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits


class Kronfluence:
    """kronfluence on a private copy of the model (``prepare_model`` rewrites modules in place), in a temporary folder.

    Args:
        problem (`Problem`): its ``param_names`` must be whole ``nn.Linear`` modules.
        strategy (`str`): kronfluence's factor strategy (``"ekfac"``, ``"kfac"``, ``"diagonal"``, ``"identity"``).
        damping (`float`, *optional*): ``damping_factor``; ``None`` is kronfluence's heuristic (0.1 × mean eigenvalue).
        empirical_fisher (`bool`, defaults to `False`): fit the factors with the true labels (the empirical Fisher)
            instead of labels sampled from the model's predictions (the true Fisher, kronfluence's default).
    """

    def __init__(self, problem: Problem, strategy: str = "ekfac", damping: float | None = 0.0, empirical_fisher: bool = False):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments

        self.folder = tempfile.TemporaryDirectory(prefix="kronfluence-")
        self.batch_size = problem.batch_size
        modules = owning_modules(problem.model, problem.param_names)
        task = _kronfluence_task(modules)
        model = prepare_model(copy.deepcopy(problem.model), task)
        self.analyzer = Analyzer("peers", model, task, cpu=True, output_dir=self.folder.name, disable_tqdm=True,
                                 disable_model_save=True)
        self.factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical_fisher)
        self.score_args = ScoreArguments(damping_factor=damping)

    def set_damping(self, damping: float | None) -> None:
        """Score with another ``damping_factor`` on the factors already fitted (a damping sweep fits once)."""
        from kronfluence.arguments import ScoreArguments

        self.score_args = ScoreArguments(damping_factor=damping)

    def fit(self, hessian: Dataset) -> None:
        self.analyzer.fit_all_factors("factors", _torch_format(hessian), per_device_batch_size=self.batch_size,
                                      factor_args=self.factor_args, overwrite_output_dir=True)

    def self_influence(self, train: Dataset) -> torch.Tensor:
        self.analyzer.compute_self_scores("self", "factors", _torch_format(train), per_device_train_batch_size=self.batch_size,
                                          score_args=self.score_args, overwrite_output_dir=True)
        return self.analyzer.load_self_scores("self")["all_modules"].detach()

    def scores(self, test: Dataset, train: Dataset, query_batch_size: int | None = None) -> torch.Tensor:
        """``[n_test, n_train]``; ``query_batch_size`` test rows are preconditioned per pass over ``train`` (default: the batch size)."""
        self.analyzer.compute_pairwise_scores("pairwise", "factors", _torch_format(test), _torch_format(train),
                                              per_device_query_batch_size=query_batch_size or self.batch_size,
                                              per_device_train_batch_size=self.batch_size, score_args=self.score_args,
                                              overwrite_output_dir=True)
        return self.analyzer.load_pairwise_scores("pairwise")["all_modules"].detach()

    def close(self) -> None:
        self.folder.cleanup()


def _torch_format(dataset: Dataset) -> Dataset:
    return dataset.with_format("torch")
