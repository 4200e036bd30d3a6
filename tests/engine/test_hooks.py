"""Per-example gradients by module hooks equal vmap's (fp64, padded batches), and so do the scores built on them."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_influence as hfi
from hf_influence._utils.errors import InvalidInputError
from hf_influence.data import PaddingCollator
from hf_influence.engine import hooks, norms
from hf_influence.engine.grads import LossFunction, eval_mode, per_example_grad_tensors, per_example_grads
from hf_influence.engine.projection import project_by_grads
from hf_influence.params import select_parameters
from hf_influence.tasks import infer_task
from tests import utils

HOOKS_RTOL = 1e-10  # fp64, relative to the largest gradient entry (key biases have exactly-zero gradients in theory)



def tiny_llama() -> LlamaForCausalLM:
    """Llama: RMS norms, gated MLP, rotary positions, untied LM head."""
    config = LlamaConfig(vocab_size=utils.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


CASES = {  # name: (builder, data, selection kwargs)
    "bert": (utils.tiny_bert, utils.classification_dataset, {}),
    "bert-last-layer": (utils.tiny_bert, utils.classification_dataset, {"last_n_layers": 1}),
    "marian": (utils.tiny_marian, utils.seq2seq_dataset, {}),
    "t5-linear": (utils.tiny_t5, utils.seq2seq_dataset, {"params": [r"\.(q|k|v|o|wi|wo)\.weight$", "shared", "lm_head"]}),
    # T5's relative position bias is not hookable (looked up at buckets the batch shares): the rest of T5 is.
    "t5": (utils.tiny_t5, utils.seq2seq_dataset, {"params": [r"^(?!.*relative_attention_bias)"]}),
    "llama": (tiny_llama, utils.lm_dataset, {}),
    "gpt2": (utils.tiny_gpt2, utils.lm_dataset, {}),
    "gpt2-classifier": (utils.tiny_gpt2_classifier, utils.classification_dataset, {}),
}


def _setup(build, make_data, selecting, n=6):
    torch.manual_seed(0)
    model = build().double().eval()
    dataset = make_data(n)
    selection = select_parameters(model, **selecting)
    batch = PaddingCollator()([dataset[i] for i in range(n)])
    assert (batch["attention_mask"] == 0).any()  # lengths differ: padding is in play
    return model, selection, LossFunction(model, infer_task(model), selection), batch


def _relative_gap(ours: dict, reference: dict) -> float:
    scale = max(float(reference[n].abs().max()) for n in reference)
    return max(float((ours[n] - reference[n]).abs().max()) for n in reference) / scale


@pytest.mark.parametrize("name", sorted(CASES))
def test_hooks_match_vmap_with_padding(name):
    model, selection, loss_fn, batch = _setup(*CASES[name])
    params = selection.tensors(model)
    assert hooks.hook_plan(loss_fn, params) is not None
    flags = [p.requires_grad for p in model.parameters()]
    with eval_mode(model):
        ours = per_example_grad_tensors(loss_fn, params, batch, mode="hooks")
        reference = per_example_grad_tensors(loss_fn, params, batch, mode="vmap")
    assert set(ours) == set(selection.names)
    assert _relative_gap(ours, reference) <= HOOKS_RTOL
    assert [p.requires_grad for p in model.parameters()] == flags  # restored


def test_auto_uses_hooks_where_supported_and_vmap_elsewhere():
    model, selection, loss_fn, batch = _setup(utils.tiny_t5, utils.seq2seq_dataset, {})
    params = selection.tensors(model)
    assert hooks.hook_plan(loss_fn, params) is None  # relative_attention_bias: looked up at buckets the batch shares
    with eval_mode(model):
        auto = per_example_grad_tensors(loss_fn, params, batch)
        reference = per_example_grad_tensors(loss_fn, params, batch, mode="vmap")
        with pytest.raises(InvalidInputError, match="mode='vmap'"):
            per_example_grad_tensors(loss_fn, params, batch, mode="hooks")
    assert loss_fn.hooks_ok is None and loss_fn.vmap_ok and _relative_gap(auto, reference) == 0.0
    model, selection, loss_fn, batch = _setup(*CASES["gpt2"])
    with eval_mode(model):
        per_example_grad_tensors(loss_fn, selection.tensors(model), batch)
    assert loss_fn.hooks_ok is True  # verified against vmap on the first batch


def test_auto_falls_back_when_hooks_disagree(monkeypatch):
    """A parameter also used outside its module would make hooks wrong: the first-batch check catches it."""
    model, selection, loss_fn, batch = _setup(*CASES["bert-last-layer"])
    params = selection.tensors(model)
    with eval_mode(model):
        reference = per_example_grad_tensors(loss_fn, params, batch, mode="vmap")
        real = hooks._accumulate
        monkeypatch.setattr(hooks, "_accumulate", lambda module, roles, a, g, grads: real(module, roles, a, 2 * g, grads))
        auto = per_example_grad_tensors(loss_fn, params, batch)
        reference = per_example_grad_tensors(loss_fn, params, batch, mode="vmap")
    assert loss_fn.hooks_ok is False
    assert _relative_gap(auto, reference) == 0.0


@pytest.mark.parametrize("selecting", [{}, {"last_n_layers": 1}])
def test_scores_unchanged_by_hooks(selecting):
    torch.manual_seed(0)
    model = utils.tiny_bert().double().eval()
    train = utils.classification_dataset(10)
    results = {}
    for path in ("hooks", "vmap"):
        inf = hfi.Influence(model, batch_size=4, progress=False, **selecting)
        if path == "vmap":
            inf.train_loss.hooks_ok = inf.test_loss.hooks_ok = False
        basis = inf.fit_arnoldi(train, rank=4, iterations=8)
        results[path] = (inf.self_influence(train, method="tracin"), inf.self_influence(train, method="arnoldi", basis=basis))
        assert inf.train_loss.hooks_ok is (True if path == "hooks" else False)
    for ours, reference in zip(results["hooks"], results["vmap"]):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)


def test_tracin_checks_hooks_on_a_few_rows(monkeypatch):
    """TracIn self-influence checks hooks against vmap on the first batch's first HOOK_CHECK_ROWS rows only (so no
    [B, P] gradients are formed), and its cost estimate counts those rows; the scores equal vmap's norms."""
    from hf_influence.engine import grads

    torch.manual_seed(0)
    model, train = utils.tiny_bert().double().eval(), utils.classification_dataset(10)
    inf = hfi.Influence(model, batch_size=4, progress=False)
    seen = []
    traced = grads._vmap_grads
    monkeypatch.setattr(grads, "_vmap_grads", lambda loss_fn, params, batch, chunk: seen.append(
        next(iter(batch.values())).shape[0]) or traced(loss_fn, params, batch, chunk))
    ours = inf.self_influence(train, method="tracin")
    assert inf.train_loss.hooks_ok is True and seen == [grads.HOOK_CHECK_ROWS]
    estimate = inf.estimate_cost("self_influence", train, method="tracin")
    assert estimate.grad_batch_bytes == 2 * grads.HOOK_CHECK_ROWS * inf.selection.num_params * 8  # hooks' and vmap's, compared
    reference = hfi.Influence(model, batch_size=4, progress=False)
    reference.train_loss.hooks_ok = False
    torch.testing.assert_close(ours, reference.self_influence(train, method="tracin"), rtol=1e-9, atol=0)


def test_arnoldi_projection_checks_hooks_on_a_few_rows(monkeypatch):
    """Arnoldi self-influence by gradients checks hooks against vmap on the first batch's first HOOK_CHECK_ROWS rows
    only (it formed the whole first batch's [B, P] twice, hooks' and vmap's, which the estimate counted once: 3.8 GiB
    over it on BERT-base), its estimate counts those rows, and the scores equal vmap's."""
    from hf_influence.engine import grads

    torch.manual_seed(0)
    model, train = utils.tiny_bert().double().eval(), utils.classification_dataset(10)
    inf = hfi.Influence(model, batch_size=4, projection="grads", progress=False)
    basis = inf.fit_arnoldi(train, rank=4, iterations=8)
    seen = []
    traced = grads._vmap_grads
    monkeypatch.setattr(grads, "_vmap_grads", lambda loss_fn, params, batch, chunk: seen.append(
        next(iter(batch.values())).shape[0]) or traced(loss_fn, params, batch, chunk))
    ours = inf.self_influence(train, method="arnoldi", basis=basis)
    assert inf.train_loss.hooks_ok is True and seen == [grads.HOOK_CHECK_ROWS]
    estimate = inf.estimate_cost("self_influence", train, method="arnoldi", basis=basis)
    assert estimate.grad_batch_bytes == 2 * grads.HOOK_CHECK_ROWS * inf.selection.num_params * 8  # hooks' and vmap's, compared
    reference = hfi.Influence(model, batch_size=4, projection="grads", progress=False)
    reference.train_loss.hooks_ok = False
    torch.testing.assert_close(ours, reference.self_influence(train, method="arnoldi", basis=basis), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["bert", "marian", "gpt2"])
def test_projections_by_hooks_match_vmap(name):
    """Module-by-module projections (an embedding's by gathering rows at the ids, padding row excluded) equal
    vmap's per-example gradients times the directions."""
    model, selection, loss_fn, batch = _setup(*CASES[name])
    params = selection.tensors(model)
    directions = torch.randn(5, selection.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with eval_mode(model):
        reference = project_by_grads(loss_fn, params, batch, directions)  # hooks not verified yet: vmap
        per_example_grad_tensors(loss_fn, params, batch)  # the first-batch check
        assert loss_fn.hooks_ok is True
        ours = project_by_grads(loss_fn, params, batch, directions)
    assert float((ours - reference).abs().max() / reference.abs().max()) <= HOOKS_RTOL


@pytest.mark.parametrize("route", ["rule", "grams", "gradients"])
@pytest.mark.parametrize("name", ["bert", "marian", "t5", "t5-linear", "gpt2", "gpt2-low-ids", "gpt2-classifier", "llama"])
def test_squared_norms_by_hooks_match_vmap(name, route, monkeypatch):
    """Squared per-example gradient norms (TracIn self-influence) without forming the gradients, by the Gram route
    (``sum((G Gᵀ) ∘ (A Aᵀ))``), by forming each module's gradient, and by the rule choosing per call; including
    parameters reached by several calls (Marian's, T5's and GPT-2's embeddings tied to the LM head; with
    ``low-ids`` the batch uses only the first half of the vocabulary) and T5's and Llama's RMS norms."""
    model, selection, loss_fn, batch = _setup(*CASES[name.removesuffix("-low-ids")])
    if name.endswith("low-ids"):
        batch = {**batch, "input_ids": batch["input_ids"] % (utils.VOCAB // 2)}
    if route != "rule":
        monkeypatch.setattr(norms, "grams_cheaper", lambda *sizes: route == "grams")
    params = selection.tensors(model)
    with eval_mode(model):
        reference = per_example_grads(loss_fn, params, batch, mode="vmap").pow(2).sum(dim=1)
        ours = norms.hook_squared_norms(loss_fn, batch, hooks.hook_plan(loss_fn, params))
    torch.testing.assert_close(ours, reference, rtol=HOOKS_RTOL, atol=0)


def test_gram_rule_counts_shared_inputs():
    """BERT-base's query, key and value (768 → 768, sharing one input) take the Grams at 512 tokens, its attention
    output (not sharing) forms the gradient; a one-token call (a pooler) always takes the Grams."""
    assert norms.grams_cheaper(512, 768, 768, readers=3) and not norms.grams_cheaper(512, 768, 768, readers=1)
    assert norms.grams_cheaper(1, 8, 8, readers=1) and not norms.grams_cheaper(64, 8, 8, readers=1)


def test_silent_tokens_are_dropped_only_where_every_example_has_zero_gradient():
    """``_drop_silent_tokens`` keeps a position whose first feature is 0 but another is not, or that one example uses."""
    g = torch.randn(2, 4, 3, dtype=torch.float64)
    g[:, 1] = 0  # silent in both examples: dropped
    g[:, 2, 0] = 0  # first feature 0 everywhere, the others not: kept
    g[0, 3] = 0  # silent in one example only: kept
    a = torch.randn(2, 4, 5, dtype=torch.float64)
    inputs, out_grad = hooks._drop_silent_tokens(a, g)
    torch.testing.assert_close(out_grad, g[:, [0, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(inputs, a[:, [0, 2, 3]], rtol=0, atol=0)
    full = torch.randn(2, 4, 3, dtype=torch.float64)
    assert hooks._drop_silent_tokens(a, full)[1] is full  # nothing to drop: the same tensors back


@pytest.mark.parametrize("case", ["bert", "gpt2-classifier"])
def test_dropping_silent_tokens_keeps_every_feature(case, monkeypatch):
    """A classifier reads one token, so its last layer's other tokens have no gradient and are dropped before the products;
    per-example gradients, Arnoldi projections and TracIn norms equal those with every token kept (fp64)."""
    build, make_data, kwargs = CASES[case]
    torch.manual_seed(0)
    model = build().double().eval()
    dataset, selection = make_data(5), select_parameters(model, **kwargs)
    batch = PaddingCollator()([dataset[i] for i in range(5)])
    loss_fn = LossFunction(model, infer_task(model), selection)
    params = selection.tensors(model)
    plan = hooks.hook_plan(loss_fn, params)
    directions = torch.randn(4, selection.num_params, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def features():
        with eval_mode(model):
            calls, _, _ = hooks._hooked_pass(loss_fn, batch, plan)
            tokens = sum(inputs.shape[1] for _, inputs, _ in calls if inputs.dim() == 3 and inputs.is_floating_point())
            grads = selection.flatten(hooks.hook_grads(loss_fn, params, batch, plan), batch_dims=1)
            projected = project_by_grads(loss_fn, params, batch, directions)
            return tokens, grads, projected, norms.hook_squared_norms(loss_fn, batch, plan)

    loss_fn.hooks_ok = True
    dropped = features()
    monkeypatch.setattr(hooks, "_drop_silent_tokens", lambda inputs, out_grad: (inputs, out_grad))
    kept = features()
    assert dropped[0] < kept[0]  # some tokens were dropped
    for fast, full in zip(dropped[1:], kept[1:]):
        assert float((fast - full).abs().max()) <= HOOKS_RTOL * float(full.abs().max())
