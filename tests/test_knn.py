"""kNN restriction: with k = N it reproduces the full scan exactly; neighbours match brute force;
the index round-trips and refuses a stale model or dataset, checked once per run; recall@m on a
constructed case; embeddings equal a hand-computed pooling of each example run alone, without padding;
a plugged-in strategy's queries are used without the facade naming it."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import hf_influence as hfi
from hf_influence import knn
from hf_influence._utils.errors import InvalidInputError, StaleIndexError
from hf_influence.data import PaddingCollator, dataset_fingerprint
from hf_influence.engine.grads import per_example_grads
from hf_influence.knn import head_gradient
from hf_influence.knn.head_gradient import classifier_output_layer, head_parameter_names
from tests import utils

EMBED_ATOL = 1e-5  # padded-batch pooling vs each example alone (fp32)
NEIGHBOR_RTOL = 1e-9  # restricted vs full scores when candidate batches are padded differently (fp64)
PARAMS = ["classifier", "pooler"]  # 323 parameters: the explicit Hessian takes well under a second
FEATURES = "classifier_input"  # FastIF's features, L2: the brute-force neighbour checks below use them
LISSA = hfi.LissaConfig(scale=1.0, steps=100, batch_size=8, seed=0)  # scale > λ_max + λ ≈ 0.17 here


@pytest.fixture(scope="module")
def setup(trained_bert):
    model, train, test = trained_bert
    inf = hfi.Influence(model, params=PARAMS, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    basis = inf.fit_arnoldi(train, rank=10, iterations=30)
    return {"inf": inf, "train": train, "test": test, "basis": basis, "index": knn.build_index(model, train, FEATURES, progress=False)}


def _scores(setup, method, **kwargs):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    return inf.scores(test, train, method=method, basis=setup["basis"], lissa=LISSA, rank=8, **kwargs)


def _brute_force_neighbors(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(queries.double(), keys.double()).topk(k, dim=1, largest=False).indices


# ----------------------------------------------------------------------------- restricted scores
@pytest.mark.parametrize("method", ["tracin", "exact", "arnoldi", "lissa", "randproj"])
def test_k_equal_n_reproduces_the_full_scan_exactly(setup, method):
    full = _scores(setup, method)  # [n_test, N]
    restricted = _scores(setup, method, knn=len(setup["train"]), index=setup["index"])
    assert restricted.indices.dtype == torch.int64
    assert torch.equal(restricted.indices.sort(dim=1).values, torch.arange(full.shape[1]).expand_as(full))
    assert torch.equal(restricted.scores, full.gather(1, restricted.indices))


@pytest.mark.parametrize("method", ["tracin", "exact", "arnoldi"])
def test_small_k_scores_the_true_nearest_neighbours(setup, method):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    restricted = _scores(setup, method, knn=5, index=setup["index"])
    keys, queries = (knn.compute_embeddings(inf.model, d, FEATURES, progress=False) for d in (train, test))
    assert torch.equal(restricted.indices, _brute_force_neighbors(queries, keys, 5))
    full = _scores(setup, method)
    torch.testing.assert_close(restricted.scores, full.gather(1, restricted.indices), rtol=NEIGHBOR_RTOL, atol=1e-12)


def test_index_is_built_on_the_fly_and_a_sequential_dataloader_works(setup):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    expected = inf.scores(test, train, method="tracin", knn=7)  # the default index, built from the Dataset
    loader = DataLoader(train, batch_size=5, collate_fn=PaddingCollator())
    from_loader = inf.scores(test, loader, method="tracin", knn=7)
    assert torch.equal(from_loader.indices, expected.indices)
    torch.testing.assert_close(from_loader.scores, expected.scores, rtol=NEIGHBOR_RTOL, atol=1e-12)


def test_bad_requests_are_refused_before_any_work(setup, monkeypatch):
    inf, train, test = setup["inf"], setup["train"], setup["test"]
    monkeypatch.setattr(inf, "_method_parts", lambda *a: pytest.fail("preconditioning ran before the checks"))
    for k in (0, len(train) + 1, 2.5, True):
        with pytest.raises(ValueError, match=rf"knn must be an integer in \[1, {len(train)}\]"):
            inf.scores(test, train, method="tracin", knn=k)
    with pytest.raises(ValueError, match="index= is only used with knn"):
        inf.scores(test, train, method="tracin", index=setup["index"])
    shuffled = DataLoader(train, batch_size=5, shuffle=True, collate_fn=PaddingCollator())
    with pytest.raises(InvalidInputError, match="shuffle=False"):
        inf.scores(test, shuffled, method="tracin", knn=3)
    with pytest.raises(StaleIndexError, match="training data: built on 48 examples"):
        inf.scores(test, train.select(range(40)), method="tracin", knn=3, index=setup["index"])


# ----------------------------------------------------------------------------- index
def test_index_round_trips_and_writes_atomically(setup, tmp_path):
    index, model, train = setup["index"], setup["inf"].model, setup["train"]
    queries = knn.compute_embeddings(model, setup["test"], FEATURES, progress=False)
    assert not knn.index_exists(tmp_path)
    assert knn.save_index(index, tmp_path) == tmp_path / "knn_index.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["knn_index.safetensors"]  # no temporary file left
    loaded = knn.load_index(tmp_path)
    assert loaded.metadata() == index.metadata()
    for got, want in zip(loaded.search(queries, 9), index.search(queries, 9)):
        assert torch.equal(got, want)
    loaded.check_compatible(model, train)
    assert torch.equal(loaded.neighbors(model, setup["test"], 4), index.search(queries, 4)[1])


def test_stale_index_is_refused(setup):
    index, model, train = setup["index"], setup["inf"].model, setup["train"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.bias.add_(1e-3)
    with pytest.raises(StaleIndexError, match=r"model: built on BertForSequenceClassification weights .*Rebuild it"):
        index.check_compatible(other, train)
    with pytest.raises(StaleIndexError, match="training data: built on 48 examples .* given 47 examples"):
        index.check_compatible(model, train.select(range(47)))
    relabelled = train.map(lambda row: {"labels": (row["labels"] + 1) % 3})
    with pytest.raises(StaleIndexError, match="training data"):
        index.check_compatible(model, relabelled)


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine", "abs_ip"])
def test_exact_search_matches_brute_force(metric):
    keys, queries = torch.randn(200, 6, generator=torch.Generator().manual_seed(1)), torch.randn(5, 6)
    faiss_index, index_type, _ = knn.index_embeddings(keys, metric=metric)
    index = knn.KnnIndex(faiss_index, metric, index_type, "custom", "m", "M", "d")
    if metric == "l2":
        expected = _brute_force_neighbors(queries, keys, 8)
    else:
        unit = (lambda x: torch.nn.functional.normalize(x.double(), dim=1)) if metric == "cosine" else (lambda x: x.double())
        similarity = unit(queries) @ unit(keys).T
        expected = (similarity.abs() if metric == "abs_ip" else similarity).topk(8, dim=1).indices
    assert index_type == "flat" and index.size == 200
    assert torch.equal(index.search(queries, 8)[1], expected)


def test_ivf_above_threshold_exhaustive_probe_is_exact_and_k_is_always_filled():
    keys, queries = torch.randn(300, 6, generator=torch.Generator().manual_seed(2)), torch.randn(4, 6)
    faiss_index, index_type, nprobe = knn.index_embeddings(keys, ivf_threshold=100, nlist=6, nprobe=6)
    assert (index_type, nprobe) == ("ivf", 6)
    exhaustive = knn.KnnIndex(faiss_index, "l2", index_type, "custom", "m", "M", "d", nprobe=6)
    assert torch.equal(exhaustive.search(queries, 10)[1], _brute_force_neighbors(queries, keys, 10))
    narrow = knn.KnnIndex(faiss_index, "l2", index_type, "custom", "m", "M", "d", nprobe=1)
    everything = narrow.search(queries, 300)[1]  # one list cannot hold 300 vectors: nprobe is widened
    assert torch.equal(everything.sort(dim=1).values, torch.arange(300).expand(4, 300))


def test_custom_embedding_must_be_given_again_on_load(setup, tmp_path):
    model, train, test = setup["inf"].model, setup["train"], setup["test"]

    def token_sums(model, batch):
        return (batch["input_ids"] * batch["attention_mask"]).sum(dim=1, keepdim=True).float()

    index = knn.build_index(model, train, embed_fn=token_sums, progress=False)
    index.save(tmp_path)
    expected = _brute_force_neighbors(knn.compute_embeddings(model, test, token_sums), knn.compute_embeddings(model, train, token_sums), 1)
    assert torch.equal(index.neighbors(model, test, 1)[:, 0], expected[:, 0])
    with pytest.raises(InvalidInputError, match="load_index\\(path, embed_fn=...\\)"):
        knn.load_index(tmp_path).neighbors(model, test, 1)
    with pytest.raises(StaleIndexError, match="built with the embedding 'custom:.*token_sums'"):
        knn.load_index(tmp_path, embed_fn=lambda model, batch: batch["input_ids"][:, :1].float())
    assert torch.equal(knn.load_index(tmp_path, embed_fn=token_sums).neighbors(model, test, 3), index.neighbors(model, test, 3))


def test_missing_faiss_gives_an_install_hint(setup, monkeypatch):
    monkeypatch.setattr("hf_influence._utils.imports.is_faiss_available", lambda: False)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        knn.build_index(setup["inf"].model, setup["train"], progress=False)


def test_row_hash_fingerprint_for_plain_datasets():
    rows = [{"input_ids": [3, 4, 5], "labels": 1}, {"input_ids": [6, 7], "labels": 0}]
    changed = [rows[0], {"input_ids": [6, 8], "labels": 0}]
    assert dataset_fingerprint(rows) == dataset_fingerprint(copy.deepcopy(rows))
    assert dataset_fingerprint(rows) != dataset_fingerprint(changed)
    assert dataset_fingerprint(rows) != dataset_fingerprint(rows[:1])


def test_fingerprint_follows_contents_not_history():
    """The Arrow path: equal rows built two ways hash alike; a selection hashes as its rows; a label change shows."""
    from datasets import Dataset

    rows = {"input_ids": [[3, 4, 5], [6, 7], [8]], "labels": [1, 0, 2], "text": ["a", "b", "c"]}
    built = Dataset.from_dict(rows)
    mapped = Dataset.from_dict({**rows, "labels": [0, 0, 0]}).map(lambda row, i: {"labels": rows["labels"][i]}, with_indices=True)
    assert dataset_fingerprint(built) == dataset_fingerprint(mapped)
    assert dataset_fingerprint(built.select([0, 2])) == dataset_fingerprint(Dataset.from_dict({k: [v[0], v[2]] for k, v in rows.items()}))
    assert dataset_fingerprint(built) != dataset_fingerprint(Dataset.from_dict({**rows, "labels": [1, 0, 0]}))


# ----------------------------------------------------------------------------- recall and top-k
def test_recall_on_a_constructed_case():
    full = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.5, -10.0],
                         [0.1, -0.2, 9.0, 8.0, -7.0, 0.3, 0.0]])  # [2, 7]
    candidates = torch.tensor([[0, 2, 5], [2, 3, 4]])
    # row 0: top-3 |s| = {6, 0, 1}, helpful = {0, 1, 2}, harmful = {6, 5, 4}
    # row 1: top-3 |s| = {2, 3, 4}, helpful = {2, 3, 5}, harmful = {4, 1, 6}
    assert hfi.knn_recall(candidates, full, 3).tolist() == pytest.approx([1 / 3, 1.0])
    assert hfi.knn_recall(candidates, full, 3, direction="helpful").tolist() == pytest.approx([2 / 3, 2 / 3])
    assert hfi.knn_recall(candidates, full, 3, direction="harmful").tolist() == pytest.approx([1 / 3, 1 / 3])
    assert hfi.knn_recall(knn.KnnScores(full.gather(1, candidates), candidates), full, 1).tolist() == [0.0, 1.0]
    assert hfi.knn_recall(torch.arange(7).expand(2, 7), full, 7).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"m must be an integer in \[1, 7\]"):
        hfi.knn_recall(candidates, full, 8)


def test_topk_orders_candidates():
    result = knn.KnnScores(torch.tensor([[1.0, -5.0, 3.0]]), torch.tensor([[10, 11, 12]]))
    top = result.topk(2)
    assert top.scores.tolist() == [[-5.0, 3.0]] and top.indices.tolist() == [[11, 12]]
    helpful = result.topk(3, direction="helpful")
    assert helpful.scores.tolist() == [[3.0, 1.0, -5.0]] and helpful.indices.tolist() == [[12, 10, 11]]
    assert result.topk(1, direction="harmful").indices.tolist() == [[11]]


# ----------------------------------------------------------------------------- embeddings
def _padded(dataset, count):
    return PaddingCollator()([dataset[i] for i in range(count)])


def _alone(batch, i):
    """Example ``i`` of a padded batch, padding stripped."""
    length = int(batch["attention_mask"][i].sum())
    return torch.as_tensor(batch["input_ids"][i, :length]).unsqueeze(0)


@torch.no_grad()
def _expected(model, batch, state_of):
    return torch.stack([state_of(model, _alone(batch, i)) for i in range(batch["input_ids"].shape[0])])


CASES = {
    "bert": (utils.tiny_bert, utils.classification_dataset, "classifier_input", lambda m, ids: m.bert(input_ids=ids).pooler_output[0]),
    "marian": (utils.tiny_marian, utils.seq2seq_dataset, "encoder_mean", lambda m, ids: m.get_encoder()(input_ids=ids).last_hidden_state[0].mean(0)),
    "t5": (utils.tiny_t5, utils.seq2seq_dataset, "encoder_mean", lambda m, ids: m.get_encoder()(input_ids=ids).last_hidden_state[0].mean(0)),
    "gpt2-classifier": (utils.tiny_gpt2_classifier, utils.classification_dataset, "classifier_input",
                        lambda m, ids: m.transformer(input_ids=ids).last_hidden_state[0, -1]),  # the score head reads the last token
    "gpt2": (utils.tiny_gpt2, utils.lm_dataset, "last_hidden_mean", lambda m, ids: m.transformer(input_ids=ids).last_hidden_state[0].mean(0)),
}
DEFAULT_EMBEDDING = {"bert": "head_gradient", "gpt2-classifier": "head_gradient", "marian": "encoder_mean", "t5": "encoder_mean",
                     "gpt2": "last_hidden_mean"}  # classifiers index the head gradient (issue 17), FastIF's features by name


@pytest.mark.parametrize("name", sorted(CASES))
def test_embeddings_equal_pooling_of_each_example_alone(name):
    build, make_data, kind, state_of = CASES[name]
    model, data = build().eval(), make_data(6, seed=3)
    batch = _padded(data, 6)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really is padded
    assert knn.infer_embedding(model) == DEFAULT_EMBEDDING[name]
    ours = knn.compute_embeddings(model.train(), data, kind, batch_size=6, progress=False)  # eval mode is forced inside
    assert ours.dtype == torch.float32 and model.training
    torch.testing.assert_close(ours, _expected(model.eval(), batch, state_of), rtol=0, atol=EMBED_ATOL)


@pytest.mark.parametrize("build", [utils.tiny_bert, utils.tiny_gpt2_classifier])
def test_classifier_input_is_what_the_head_reads(build):
    """Applying the head's output layer to the embedding gives the model's own logits."""
    model, data = build().eval(), utils.classification_dataset(6, seed=4)
    batch = _padded(data, 6)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        from_embedding = classifier_output_layer(model)(knn.compute_embeddings(model, data, "classifier_input", batch_size=6, progress=False))
    torch.testing.assert_close(from_embedding, logits, rtol=0, atol=EMBED_ATOL)


@pytest.mark.parametrize("build", [utils.tiny_bert, utils.tiny_gpt2_classifier])
def test_head_gradient_inner_products_are_tracin_on_the_head(build):
    """head_gradient rows are the per-example loss gradients of the head (BERT: pooler + classifier;
    GPT-2: its score layer at the last token): their inner products equal TracIn over those parameters."""
    model, data = build().eval(), utils.classification_dataset(8, seed=5)
    names = head_parameter_names(model)
    assert names == (["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
                     if build is utils.tiny_bert else ["score.weight"])
    embeddings = knn.compute_embeddings(model, data, "head_gradient", batch_size=4, progress=False).double()
    tracin = hfi.Influence(model, params=[f"^{n}$" for n in names], batch_size=4, progress=False).scores(data, data, method="tracin")
    torch.testing.assert_close(embeddings @ embeddings.T, tracin.double(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "arnoldi"])
def test_head_gradient_search_finds_the_true_top_k_when_the_head_is_the_selection(method):
    """With the head as the whole parameter selection the preconditioned query's inner product with a row
    *is* the score, so the candidates are exactly the top-k by |score| of the full scan, for any estimator."""
    model, train, test = utils.tiny_bert().eval(), utils.classification_dataset(30, seed=7), utils.classification_dataset(4, seed=8)
    inf = hfi.Influence(model, params=[f"^{n}$" for n in head_parameter_names(model)], damping=0.01, batch_size=8, progress=False)
    basis = inf.fit_arnoldi(train, rank=8, iterations=20) if method == "arnoldi" else None
    index = knn.build_index(model, train, "head_gradient", progress=False)
    full = inf.scores(test, train, method=method, basis=basis)
    restricted = inf.scores(test, train, method=method, basis=basis, knn=5, index=index)
    assert hfi.knn_recall(restricted, full, 5).tolist() == [1.0] * 4
    torch.testing.assert_close(restricted.scores, full.gather(1, restricted.indices))


def test_head_gradient_query_without_the_head_in_the_selection_uses_test_gradients():
    """A selection without the head cannot precondition the query: the test rows' own head gradients are
    searched, so the candidates are the top-k of TracIn over the head."""
    model, train, test = utils.tiny_bert().eval(), utils.classification_dataset(30, seed=7), utils.classification_dataset(3, seed=8)
    index = knn.build_index(model, train, "head_gradient", progress=False)
    inf = hfi.Influence(model, params=[r"^bert\.encoder\.layer\.1\.output\.dense\."], damping=0.01, batch_size=8, progress=False)
    candidates = inf.scores(test, train, method="exact", knn=4, index=index).indices
    head = hfi.Influence(model, params=[f"^{n}$" for n in head_parameter_names(model)], batch_size=8, progress=False)
    expected = head.scores(test, train, method="tracin").abs().topk(4, dim=1).indices
    assert candidates.sort(dim=1).values.tolist() == expected.sort(dim=1).values.tolist()


def test_wide_head_sides_are_projected_consistently_and_keep_inner_products(monkeypatch):
    """Sides wider than MAX_SIDE go through fixed Gaussian maps: a query built from a test gradient equals that
    example's own row (same maps on both sides), and projected inner products track TracIn on the head
    (unbiased maps; Pearson >= 0.9 at 24 of 32-33 columns per side)."""
    monkeypatch.setattr(head_gradient, "MAX_SIDE", 24)
    model, data = utils.tiny_bert(hidden=32).eval(), utils.classification_dataset(40, seed=9)
    names = head_parameter_names(model)
    rows = knn.compute_embeddings(model, data, "head_gradient", batch_size=8, progress=False)
    assert rows.shape[1] == 24 * 24 + 3 * 24  # pooler: (32 -> 24) outputs x (33 -> 24) inputs; classifier: 3 x (33 -> 24)
    inf = hfi.Influence(model, params=[f"^{n}$" for n in names], batch_size=8, progress=False)
    queries = head_gradient.head_queries(model, inf.selection.unflatten(inf.gradients(data)))
    torch.testing.assert_close(queries, rows, rtol=1e-4, atol=1e-6)
    tracin = inf.scores(data, data, method="tracin").double()
    projected = (rows.double() @ rows.double().T)
    assert torch.corrcoef(torch.stack([projected.flatten(), tracin.flatten()]))[0, 1] >= 0.9


def test_head_gradient_needs_labels():
    model, data = utils.tiny_bert().eval(), utils.classification_dataset(4, seed=6).remove_columns("labels")
    with pytest.raises(InvalidInputError, match="needs labels"):
        knn.compute_embeddings(model, data, "head_gradient", progress=False)


# ----------------------------------------------------------------------------- defaults, strategies, one check per run
def test_classifiers_default_to_the_head_gradient_and_fastif_features_stay_selectable(setup):
    model, train = setup["inf"].model, setup["train"]
    default = knn.build_index(model, train, progress=False)
    heads = knn.compute_embeddings(model, train, "head_gradient", progress=False)  # [N, d]
    assert (default.embedding, default.metric, default.dim) == ("head_gradient", "abs_ip", heads.shape[1])
    expected = (heads[:6].double() @ heads.double().T).abs().topk(3, dim=1).indices
    assert torch.equal(default.search(heads[:6], 3)[1], expected)
    assert (setup["index"].embedding, setup["index"].metric) == ("classifier_input", "l2")


class SelectionGradient(knn.Embedding):
    """A strategy from outside the library: each row is the example's gradient over the whole selection, and the
    query is the preconditioned test gradient in parameter space, so query · row is the influence score itself."""

    name, metric = "selection_gradient", "abs_ip"

    def __init__(self, inf):
        self.inf = inf

    def embed(self, model, batch):
        return per_example_grads(self.inf.train_loss, self.inf.selection.tensors(model), batch)

    def queries(self, model, selection, preconditioned, directions):
        return preconditioned if directions is None else preconditioned @ directions.to(preconditioned.dtype)


@pytest.mark.parametrize("method", ["exact", "arnoldi"])
def test_a_plugged_in_strategy_supplies_the_queries(setup, method):
    """The facade uses the strategy's queries without naming it: the candidates are the full scan's top-k by |score|."""
    index = knn.build_index(setup["inf"].model, setup["train"], SelectionGradient(setup["inf"]), progress=False)
    assert (index.embedding, index.metric) == ("selection_gradient", "abs_ip")
    full = _scores(setup, method)
    restricted = _scores(setup, method, knn=5, index=index)
    assert hfi.knn_recall(restricted, full, 5).tolist() == [1.0] * full.shape[0]
    torch.testing.assert_close(restricted.scores, full.gather(1, restricted.indices), rtol=NEIGHBOR_RTOL, atol=1e-12)


def test_the_index_is_verified_once_per_run_and_again_when_weights_or_data_change(setup, monkeypatch):
    model, train, test = copy.deepcopy(setup["inf"].model), setup["train"], setup["test"]
    inf = hfi.Influence(model, params=PARAMS, damping=utils.BERT_DAMPING, batch_size=16, progress=False)
    index = knn.build_index(model, train, FEATURES, progress=False)
    hashes, fingerprint = [], knn.index.model_fingerprint
    monkeypatch.setattr(knn.index, "model_fingerprint", lambda m: hashes.append(m) or fingerprint(m))
    for shard in ([0, 1], [2], [3, 4, 5]):  # as a sharded job calls it
        inf.scores(test.select(shard), train, method="tracin", knn=4, index=index)
    assert len(hashes) == 1
    saved = model.classifier.bias.detach().clone()
    with torch.no_grad():
        model.classifier.bias.add_(1e-3)  # in place: same tensor, new weights
    with pytest.raises(StaleIndexError, match="model: built on"):
        inf.scores(test, train, method="tracin", knn=4, index=index)
    with torch.no_grad():
        model.classifier.bias.copy_(saved)
    inf.scores(test, train, method="tracin", knn=4, index=index)
    with pytest.raises(StaleIndexError, match="training data: built on 48 examples"):
        inf.scores(test, train.select(range(40)), method="tracin", knn=3, index=index)
    assert len(hashes) == 4


@pytest.mark.parametrize("embedding", ["head_gradient", "classifier_input"])
def test_progress_false_shows_no_bar(setup, capfd, embedding):
    model, train, test = setup["inf"].model, setup["train"], setup["test"]
    knn.build_index(model, train, embedding, progress=False)
    setup["inf"].scores(test, train, method="tracin", knn=3)  # the index is built on the fly with the Influence's progress=False
    assert capfd.readouterr().err == ""
    knn.build_index(model, train, embedding, progress=True)
    assert "embeddings" in capfd.readouterr().err
