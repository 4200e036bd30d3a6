"""PEFT / LoRA models: task inference through the wrapper, the adapter as the default selection, exact
influence over the LoRA parameters against an explicit-Hessian oracle, and a PEFT model against the same
adapter written out as a plain parameterization."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hf_influence as hfi
from hf_influence._utils.errors import IncompatibleBasisError, ParameterSelectionError
from hf_influence.tasks import CausalLMTask, Seq2SeqTask, SequenceClassificationTask
from tests import utils

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, TaskType, get_peft_model  # noqa: E402

ORACLE_RTOL = 1e-6  # engine vs explicit fp64 Hessian, relative to the largest |score|
FP32_PARTS_RTOL = 1e-5  # the same for Llama (rotary embeddings) and T5 (RMSNorm variance), run in float32 even in a float64 model
EXPLICIT_RTOL = 1e-9  # PEFT model vs the adapter merged by hand, fp64
DAMPING, RANK, ALPHA, N_TRAIN, N_TEST = 1.0, 1, 4, 6, 3  # rank 1 on one layer: P stays ~100 (the oracle costs P HVPs)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=utils.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


# name -> (base model builder, PEFT task type, LoRA targets, extra LoraConfig settings, dataset builder, task class)
MODELS = {
    "bert-classifier": (utils.tiny_bert, TaskType.SEQ_CLS, ["query", "value"], {"layers_to_transform": [1]}, utils.classification_dataset,
                        SequenceClassificationTask),
    "gpt2-conv1d": (utils.tiny_gpt2, TaskType.CAUSAL_LM, ["c_attn"], {"fan_in_fan_out": True, "layers_to_transform": [1]}, utils.lm_dataset,
                    CausalLMTask),
    "llama-q-v": (tiny_llama, TaskType.CAUSAL_LM, ["q_proj", "v_proj"], {"layers_to_transform": [1]}, utils.lm_dataset, CausalLMTask),
    "t5-seq2seq": (utils.tiny_t5, TaskType.SEQ_2_SEQ_LM, ["q"], {}, utils.seq2seq_dataset, Seq2SeqTask),
}


def lora_model(name: str, adapter: str = "default", seed: int = 0):
    """(fp64 PEFT model, untouched copy of its base model, train, test). LoRA B is drawn at random (PEFT starts
    it at 0, where the gradient wrt A vanishes and the test would check little)."""
    build, task_type, targets, extra, data, _ = MODELS[name]
    torch.manual_seed(seed)
    base = build().double()
    original = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(task_type=task_type, r=RANK, lora_alpha=ALPHA, target_modules=targets, **extra),
                           adapter_name=adapter).double()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.1)
    return model.eval(), original.eval(), data(N_TRAIN, seed=1), data(N_TEST, seed=2)


def oracle_loss(model, row: dict, task_class) -> torch.Tensor:
    """One example's loss from the model's own HF loss (a mean over target tokens) times its target count."""
    ids = torch.tensor([row["input_ids"]])
    if task_class is SequenceClassificationTask:
        return model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss
    if task_class is CausalLMTask:
        return model(input_ids=ids, labels=ids).loss * (ids.shape[1] - 1)
    labels = torch.tensor([row["labels"]])
    return model(input_ids=ids, labels=labels).loss * labels.shape[1]


def flat_rows(parts) -> torch.Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def oracle_scores(model, train, test, task_class) -> torch.Tensor:
    """``g_test (H + λI)^-1 g_trainᵀ`` from per-example autograd on unpadded examples and the explicit Hessian of
    the mean training loss (double backward), both over the trainable (adapter) parameters."""
    with sdpa_kernel(SDPBackend.MATH):  # double backward needs the math attention kernel
        return _oracle_scores(model, train, test, task_class)


def _oracle_scores(model, train, test, task_class) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda parts: torch.cat([p.reshape(-1) for p in parts])  # noqa: E731
    grads = lambda data: torch.stack([flat(torch.autograd.grad(oracle_loss(model, row, task_class), params)) for row in data])  # noqa: E731
    mean_loss = torch.stack([oracle_loss(model, row, task_class) for row in train]).mean()
    gradient = flat(torch.autograd.grad(mean_loss, params, create_graph=True))
    eye = torch.eye(gradient.numel(), dtype=gradient.dtype)
    hessian = flat_rows(torch.autograd.grad(gradient, params, eye, is_grads_batched=True))  # one vmapped backward: [P, P]
    shifted = (hessian + hessian.T) / 2 + DAMPING * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    return grads(test) @ torch.linalg.solve(shifted, grads(train).T)  # [n_test, n_train]


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_influence_over_lora_parameters_equals_the_explicit_hessian_oracle(name):
    model, _, train, test = lora_model(name)
    inf = hfi.Influence(model, damping=DAMPING, batch_size=4, progress=False)
    assert isinstance(inf.task, MODELS[name][5])
    assert all("lora_" in n or "modules_to_save" in n for n in inf.selection.names)
    expected = oracle_scores(model, train, test, MODELS[name][5])
    scores = inf.scores(test, train, method="exact")
    tolerance = FP32_PARTS_RTOL if name.startswith(("llama", "t5")) else ORACLE_RTOL
    torch.testing.assert_close(scores, expected, rtol=0, atol=tolerance * float(expected.abs().max()))


class MergedLoRA(nn.Module):
    """A LoRA-adapted layer written out: one weight ``W + s·(B A)`` (transposed for GPT-2's ``Conv1D``, which
    stores ``W`` as ``[in, out]`` and computes ``x W + b``), with only ``A`` and ``B`` trainable."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool):
        super().__init__()
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.A, self.B = nn.Parameter(lora_a.detach().clone()), nn.Parameter(lora_b.detach().clone())
        self.scaling, self.fan_in_fan_out = scaling, fan_in_fan_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.scaling * self.B @ self.A  # [out, in]
        if self.fan_in_fan_out:
            return x @ (self.weight + delta.T) + self.bias
        return F.linear(x, self.weight + delta, self.bias)


def merged_by_hand(peft_model, original: nn.Module, fan_in_fan_out: bool) -> nn.Module:
    """``original`` with each LoRA-adapted layer of ``peft_model`` replaced by `MergedLoRA` and its head copied
    from PEFT's trainable copy; everything else frozen."""
    explicit = copy.deepcopy(original).requires_grad_(False)
    for path, module in peft_model.get_base_model().named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            parent, _, child = path.rpartition(".")
            layer = MergedLoRA(explicit.get_submodule(path), module.lora_A["default"].weight, module.lora_B["default"].weight,
                               module.scaling["default"], fan_in_fan_out)
            setattr(explicit.get_submodule(parent), child, layer)
        if hasattr(module, "modules_to_save") and "default" in module.modules_to_save:
            head = explicit.get_submodule(path)
            head.load_state_dict(module.modules_to_save["default"].state_dict())
            head.requires_grad_(True)
    return explicit.eval()


@pytest.mark.parametrize("name", ["bert-classifier", "gpt2-conv1d"])
def test_peft_model_scores_equal_the_adapter_merged_by_hand(name):
    model, original, train, test = lora_model(name)
    explicit = merged_by_hand(model, original, fan_in_fan_out=MODELS[name][3].get("fan_in_fan_out", False))
    with torch.no_grad():  # the two models compute the same function
        batch = {"input_ids": torch.tensor([test[0]["input_ids"]])}
        torch.testing.assert_close(model(**batch).logits, explicit(**batch).logits, rtol=EXPLICIT_RTOL, atol=1e-12)
    peft_inf = hfi.Influence(model, damping=DAMPING, batch_size=4, progress=False)
    explicit_inf = hfi.Influence(explicit, damping=DAMPING, batch_size=4, progress=False)
    assert explicit_inf.selection.num_params == peft_inf.selection.num_params
    expected = explicit_inf.scores(test, train, method="exact")
    torch.testing.assert_close(peft_inf.scores(test, train, method="exact"), expected, rtol=EXPLICIT_RTOL, atol=1e-12)


def test_default_selection_is_the_adapter_and_last_n_layers_keeps_the_last_block_of_it():
    model, _, _, _ = lora_model("bert-classifier")
    inf = hfi.Influence(model, progress=False)
    assert list(inf.selection.names) == [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("modules_to_save.default" in n for n in inf.selection.names) == 2  # classifier weight and bias
    assert sum("lora_A" in n for n in inf.selection.names) == 2  # query and value of layer 1
    assert hfi.Influence(model, last_n_layers=1, progress=False).selection == inf.selection  # the adapter sits in the last layer
    with pytest.raises(ParameterSelectionError, match="matches no trainable parameter"):
        hfi.Influence(model, params=[r"encoder\.layer\.0\."], progress=False)  # the frozen base is never selected


def test_an_adapter_loaded_for_inference_selects_the_same_parameters_and_reuses_the_basis(tmp_path):
    model, original, train, _ = lora_model("bert-classifier")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(original, tmp_path).double().eval()  # is_trainable=False: nothing requires grad
    assert not any(p.requires_grad for p in loaded.parameters())
    inf, loaded_inf = (hfi.Influence(m, damping=DAMPING, batch_size=4, progress=False) for m in (model, loaded))
    assert loaded_inf.selection == inf.selection
    basis = inf.fit_arnoldi(train, rank=3, iterations=6)
    torch.testing.assert_close(loaded_inf.self_influence(train, basis=basis), inf.self_influence(train, basis=basis))


def test_a_basis_fitted_on_one_adapter_is_refused_on_another():
    model, _, train, _ = lora_model("bert-classifier", adapter="first")
    basis = hfi.Influence(model, damping=DAMPING, progress=False).fit_arnoldi(train, rank=2, iterations=4)
    model.add_adapter("second", model.peft_config["first"])
    model.set_adapter("second")
    with pytest.raises(IncompatibleBasisError, match=r"another PEFT adapter: saved \['first'\], requested \['second'\]"):
        hfi.Influence(model, damping=DAMPING, progress=False).self_influence(train, basis=basis)

    same_weights, _, _, _ = lora_model("bert-classifier", adapter="first")
    same_weights.peft_config["first"].lora_alpha = 2 * ALPHA  # same tensors, another scaling: another function
    with pytest.raises(IncompatibleBasisError, match="PEFT adapter"):
        hfi.Influence(same_weights, damping=DAMPING, progress=False).self_influence(train, basis=basis)


def test_influence_trainer_fits_and_scores_a_lora_classifier(tmp_path):
    """End to end through the Trainer: train the adapter, fit the basis, score; equal to the facade on the same basis."""
    from hf_influence.data import PaddingCollator

    torch.manual_seed(0)
    model = get_peft_model(utils.tiny_bert(), LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query", "value"]))
    train = utils.classification_dataset(24, seed=1)
    args = hfi.InfluenceTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                                          num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-2, influence_rank=4,
                                          influence_iterations=8, influence_damping=0.1, influence_batch_size=8)
    trainer = hfi.InfluenceTrainer(model=model, args=args, train_dataset=train, data_collator=PaddingCollator())
    trainer.train()
    basis = trainer.fit_influence()
    assert list(basis.param_names) == [n for n, p in model.named_parameters() if p.requires_grad]
    scores = trainer.self_influence()
    inf = hfi.Influence(model, damping=0.1, batch_size=8, progress=False)
    torch.testing.assert_close(scores, inf.self_influence(train, basis=basis), atol=1e-5, rtol=1e-4)
