"""Every influence setting, its default and its rule, written once.

`InfluenceConfig` is what an `Influence` computes with (parameter selection, damping, batches, seed,
projection, memory budget, Hessian rows); `BasisConfig` is how an eigenbasis is fitted; `ScoringConfig`
is how a sharded scoring job runs. Python (`Influence(...)`), the Trainer (`influence_*` fields, built
from these classes by :func:`prefixed_fields`), the CLI (dataclasses that subclass these) and the
recipes all map onto them, so defaults and checks are identical everywhere. Choices are string
enums: ``"arnoldi"`` and ``Method.ARNOLDI`` are interchangeable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, TypeVar

from ._utils.errors import InvalidInputError


class Method(str, Enum):
    """Scoring methods."""

    EXACT = "exact"
    LISSA = "lissa"
    ARNOLDI = "arnoldi"
    TRACIN = "tracin"
    RANDPROJ = "randproj"


class Curvature(str, Enum):
    """The matrix an eigenbasis decomposes: the Hessian (Arnoldi) or the empirical Fisher (exact SVD)."""

    HESSIAN = "hessian"
    FISHER = "fisher"


class Algorithm(str, Enum):
    """How a Hessian eigenbasis fit spends its HVPs: one vector per pass over the Hessian rows (``iterations`` passes in
    sequence), or a block of b vectors per pass (about ``iterations / b`` passes; b chosen from the memory budget)."""

    ARNOLDI = "arnoldi"
    BLOCK = "block"


class Keep(str, Enum):
    """Which ``rank`` Ritz pairs a Hessian eigenbasis keeps: those of largest |λ| (Schioppa et al. 2022), or of largest λ
    (captum, dattri). With damping d a direction u adds about λ/(λ + d) to a damped score, increasing in λ, so a negative
    λ kept by |λ| displaces a positive one that matters more; the Fisher (positive semi-definite) is the same either way."""

    MAGNITUDE = "magnitude"
    LARGEST = "largest"


class Projection(str, Enum):
    """How gradients are projected on a basis: forward-mode JVPs, per-example gradients, or the cheaper."""

    AUTO = "auto"
    JVP = "jvp"
    GRADS = "grads"


class RandomProjection(str, Enum):
    """The random map of random projection and of an index's projected TracIn: a dense orthonormal ``[p̄, P]`` subspace,
    or Kronecker-structured per-parameter maps applied in the hooked pass (``engine/kronecker.py``)."""

    DENSE = "dense"
    KRONECKER = "kronecker"


class Metric(str, Enum):
    """kNN index metrics: squared L2, inner product, cosine, largest |inner product|."""

    L2 = "l2"
    IP = "ip"
    COSINE = "cosine"
    ABS_IP = "abs_ip"


SHARDED_METHODS = (Method.ARNOLDI, Method.TRACIN)  # one preconditioner serves every shard
E = TypeVar("E", bound=Enum)
C = TypeVar("C")


def as_choice(kind: type[E], value: Any, setting: str) -> E:
    """``value`` as a member of the string enum ``kind``, or an error naming ``setting`` and the valid values."""
    try:
        return kind(value)
    except ValueError:
        raise InvalidInputError(f"{setting} must be one of {[m.value for m in kind]}, got {value!r}.") from None


def check_damping(damping: Any, setting: str = "damping") -> float:
    """Damping is additive (every solver targets ``(H + damping·I)^-1``) and must be a number >= 0."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or damping != damping or damping < 0:
        raise InvalidInputError(
            f"{setting} must be a number >= 0 (the solvers target (H + damping·I)^-1), got {damping!r}. "
            "For FastIF's (damp, scale) pair use damping = damp * scale."
        )
    return float(damping)


def check_count(value: Any, setting: str, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` must be an integer >= ``minimum`` (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{setting} must be an integer >= {minimum}{' (or unset)' if optional else ''}, got {value!r}.")
    return value


@dataclass
class InfluenceConfig:
    """What an `Influence` computes with. Every field has its one default here."""

    params: list[str] | None = field(default=None, metadata={
        "help": "Regexes (re.search on parameter names) selecting the parameters influence is taken over "
                "(default: all trainable; on a PEFT model, its trainable adapter parameters)."})
    last_n_layers: int | None = field(default=None, metadata={
        "help": "Select the last k transformer layers + head/pooler/final norms instead (no embeddings)."})
    damping: float = field(default=1e-3, metadata={"help": "Additive damping λ: scores use (H + λI)^-1."})
    batch_size: int = field(default=8, metadata={"help": "Examples per batch for per-example gradients and HVPs."})
    seed: int = field(default=0, metadata={
        "help": "Seed of every random choice: Hessian rows, Arnoldi start vector, probes, LiSSA minibatches, subspaces."})
    projection: str = field(default="auto", metadata={
        "help": "Projection on a basis: 'jvp' (forward mode), 'grads' (per-example gradients) or 'auto' (the cheaper)."})
    random_projection: str = field(default="dense", metadata={
        "help": "Random map of method='randproj' and of an index's projected TracIn: 'dense' (a seeded orthonormal [p̄, P] "
                "subspace, held in memory) or 'kronecker' (per-parameter (R_r ⊗ R_c) maps, applied to hooked gradient "
                "pieces without forming per-example gradients or a [p̄, P] matrix; p̄ split over parameters ∝ sqrt(size))."})
    memory_budget_gb: float = field(default=2.0, metadata={
        "help": "Bound, in GiB, on the large tensors a call holds at once (bases, Krylov vectors, per-example gradients, the "
                "explicit Hessian; not the model): block widths, gradient chunks and the Fisher fit's path follow it, and a "
                "call estimated over it is refused before any work with the ways out (Influence.estimate_cost)."})
    hessian_examples: int | None = field(default=512, metadata={
        "help": "The Hessian is that of the mean loss over a seeded random subset of this many rows of the Hessian "
                "data (all rows when it has fewer, or when unset)."})
    hessian_batch_size: int | None = field(default=None, metadata={
        "help": "Rows per batch in the Hessian passes (HVPs of fits, spectrum, explicit Hessian); rows are grouped by length "
                "and each batch cut to its longest row. The product is the same mean for any size; fewer, larger batches "
                "mean fewer calls. Unset: as many rows as fit batch_size × the longest Hessian row in tokens (no more "
                "memory than batch_size rows, many more short rows per call)."})

    def __post_init__(self):
        if self.params is not None:
            self.params = [self.params] if isinstance(self.params, str) else list(self.params)
        if self.params is not None and self.last_n_layers is not None:
            raise InvalidInputError("params and last_n_layers are both set: keep one (regexes, or the last k layers + head).")
        check_count(self.last_n_layers, "last_n_layers", optional=True)
        self.damping = check_damping(self.damping)
        check_count(self.batch_size, "batch_size")
        check_count(self.seed, "seed", minimum=0)
        self.projection = as_choice(Projection, self.projection, "projection").value
        self.random_projection = as_choice(RandomProjection, self.random_projection, "random_projection").value
        if isinstance(self.memory_budget_gb, bool) or not isinstance(self.memory_budget_gb, (int, float)) or not self.memory_budget_gb > 0:
            raise InvalidInputError(f"memory_budget_gb must be a number > 0, got {self.memory_budget_gb!r}.")
        check_count(self.hessian_examples, "hessian_examples", optional=True)
        check_count(self.hessian_batch_size, "hessian_batch_size", optional=True)


@dataclass
class BasisConfig:
    """How an eigenbasis is fitted (`Influence.fit_basis`)."""

    rank: int = field(default=20, metadata={"help": "Eigenpairs kept (p̄): those of largest |λ| (or λ, see keep)."})
    iterations: int = field(default=100, metadata={
        "help": "Hessian: Arnoldi iterations (one HVP pass over the Hessian rows each), >= rank. Fisher: unused."})
    curvature: str = field(default="hessian", metadata={
        "help": "'hessian' (Arnoldi, `iterations` HVP passes) or 'fisher' (the empirical Fisher's exact eigenpairs from "
                "one pass of per-example gradients over the Hessian rows)."})
    algorithm: str = field(default="arnoldi", metadata={
        "help": "Hessian fits: 'arnoldi' (one HVP per pass, `iterations` passes in sequence) or 'block' (block Krylov: b HVPs "
                "per pass from one graph-keeping backward, about iterations / b passes; b from memory_budget_gb, logged)."})
    tol: float = field(default=1e-3, metadata={
        "help": "Hessian fits stop once the `rank` Ritz pairs kept have converged: each residual ‖Hu - λu‖ <= tol × |λ_max| "
                "(read from the Krylov matrix every few steps, no extra HVP); `iterations` is then the cap. 0: always run "
                "`iterations`. The iterations run are logged and saved on the basis."})
    keep: str = field(default="magnitude", metadata={
        "help": "Hessian fits: which `rank` eigenpairs the basis keeps, 'magnitude' (largest |λ|, Schioppa et al.) or "
                "'largest' (largest λ, as captum and dattri; for damped scores a negative λ matters less than a positive "
                "one). A basis answers only requests for its own choice."})
    block_size: int | None = field(default=None, metadata={
        "help": "algorithm='block' only: the block width b (vectors per pass), capped by memory_budget_gb with a logged note. "
                "None: chosen from memory_budget_gb and two timed passes, so two fits of the same data (e.g. on 1 or 2 "
                "processes) may choose different widths; fix it for fits that must agree."})

    def __post_init__(self):
        check_count(self.rank, "rank")
        check_count(self.iterations, "iterations")
        self.curvature = as_choice(Curvature, self.curvature, "curvature").value
        self.algorithm = as_choice(Algorithm, self.algorithm, "algorithm").value
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise InvalidInputError(f"tol must be a number in [0, 1) (residuals relative to |λ_max|; 0 runs every iteration), "
                                    f"got {self.tol!r}.")
        self.tol = float(self.tol)
        self.keep = as_choice(Keep, self.keep, "keep").value
        check_count(self.block_size, "block_size", optional=True)
        if self.block_size is not None and self.algorithm != Algorithm.BLOCK:
            raise InvalidInputError(f"block_size={self.block_size} is the width of algorithm='block' fits; algorithm is "
                                    f"{self.algorithm!r}: set algorithm='block' or leave block_size unset.")
        if self.curvature == Curvature.HESSIAN and self.rank > self.iterations:
            raise InvalidInputError(f"rank must be <= iterations for the Hessian, got rank={self.rank}, iterations={self.iterations}: "
                                    "raise iterations.")


def implicit_iterations(rank: int) -> int:
    """Krylov steps when a fit runs without a `BasisConfig` (``scores(method="arnoldi")`` with no basis, the streamed
    Fisher fit): enough past ``rank`` for the top ``rank`` eigenpairs to settle."""
    return max(2 * rank, rank + 20)


@dataclass
class ScoringConfig:
    """How a sharded scoring job runs (`hf_influence.jobs`)."""

    method: str = field(default="arnoldi", metadata={
        "help": "arnoldi (scores in the fitted eigenbasis) or tracin (gradient dot product). Exact, LiSSA and random "
                "projection are in the Python API (Influence.scores); LiSSA's s_test also in `hf-influence stest`."})
    shard_size: int = field(default=1024, metadata={
        "help": "Rows per saved shard. Fixed partitions: any process count resumes them; keep it when resuming."})

    def __post_init__(self):
        self.method = sharded_method(self.method).value
        check_count(self.shard_size, "shard_size")


def sharded_method(method: str | Method) -> Method:
    """``method`` as a `Method` if sharded jobs support it: one preconditioner serves every shard."""
    method = as_choice(Method, method, "method")
    if method not in SHARDED_METHODS:
        raise InvalidInputError(
            f"method must be one of {[m.value for m in SHARDED_METHODS]} for sharded scoring, got {method.value!r}: exact, "
            "LiSSA and random projection rebuild their preconditioner for every shard. Use Influence.scores(...) in "
            "Python for those, or `hf-influence stest` for LiSSA."
        )
    return method


def prefixed_fields(prefix: str, *configs: type) -> list[tuple[str, Any, Any]]:
    """The fields of ``configs`` renamed ``prefix + name``, same types, defaults and help (for ``make_dataclass``)."""
    result = []
    for config in configs:
        hints = typing.get_type_hints(config)
        for item in dataclasses.fields(config):
            result.append((prefix + item.name, hints[item.name], field(default=item.default, metadata=item.metadata)))
    return result


@contextlib.contextmanager
def settings_named(prefix: str) -> Iterator[None]:
    """Re-raise a settings error with each setting named as the caller spells it (``--damping``, ``influence_damping``).
    Every message of this module starts with the setting's name, so the prefix lands on it."""
    try:
        yield
    except InvalidInputError as err:
        raise InvalidInputError(f"{prefix}{err}") from None


def unprefixed(settings: Any, prefix: str, config: type[C]) -> C:
    """An instance of ``config`` from ``settings``' ``prefix + name`` attributes (the inverse of :func:`prefixed_fields`)."""
    with settings_named(prefix):
        return config(**{item.name: getattr(settings, prefix + item.name) for item in dataclasses.fields(config)})


def pick(settings: Any, config: type[C]) -> C:
    """An instance of ``config`` from the same-named attributes of ``settings`` (a CLI or recipe dataclass)."""
    return config(**{item.name: getattr(settings, item.name) for item in dataclasses.fields(config)})
