"""Frozen-prefix replay on PEFT (LoRA) models: the layers below the adapter are found and replayed, HVPs and the
fitted basis equal those of full passes, and where nothing can be replayed the log says why.

A LoRA layer's ``lora_dropout`` (``nn.Identity``, or an eval-mode ``nn.Dropout``) returns the tensor it is given, so
that tensor is the output of two prefix modules: the layer below and the dropout. The replay used to keep it for the
dropout only and replay the layer below as a zero stand-in, which the other readers (BERT's key / value, Llama's
k_proj / v_proj) then saw; its check caught the changed HVP and every pass ran the whole model."""

import logging

import pytest
import torch

import hf_influence as hfi
from hf_influence.engine import prefix as prefix_module
from tests import utils
from tests.engine.test_prefix import batches_of, replay

peft = pytest.importorskip("peft")
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

HVP_RTOL, HVP_ATOL = 1e-10, 1e-12  # fp64: replayed and recomputed prefixes give the same products to round-off
BASIS_ATOL = 1e-8  # fp64 eigenpairs of the two fits (Arnoldi amplifies round-off a little)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=utils.VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


# name -> (base model, PEFT task, LoRA targets on the last layer only, dataset, the module below the adapter that must be kept)
MODELS = {
    "bert": (lambda: utils.tiny_bert(layers=3), TaskType.SEQ_CLS, {"target_modules": ["query", "value"], "layers_to_transform": [2]},
             utils.classification_dataset, "bert.encoder.layer.1"),
    "llama": (tiny_llama, TaskType.CAUSAL_LM, {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}, utils.lm_dataset,
              "model.layers.1.input_layernorm"),
    "gpt2": (utils.tiny_gpt2, TaskType.CAUSAL_LM, {"target_modules": ["c_attn"], "fan_in_fan_out": True, "layers_to_transform": [1]},
             utils.lm_dataset, "transformer.h.0"),
}


def lora_model(name: str, dropout: float = 0.1, **overrides):
    """An fp64 PEFT model with LoRA on the last layer only (B drawn at random: PEFT starts it at 0), and its data."""
    build, task_type, targets, data, _ = MODELS[name]
    torch.manual_seed(0)
    settings = {**targets, **overrides}
    model = get_peft_model(build().double(), LoraConfig(task_type=task_type, r=2, lora_alpha=4, lora_dropout=dropout, **settings)).double()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.1)
    return model.eval(), data(10, seed=1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # nn.Identity / eval-mode nn.Dropout: both return their input
@pytest.mark.parametrize("name", list(MODELS))
def test_lora_on_the_last_layer_replays_the_layers_below_and_keeps_the_hvps(name, dropout):
    model, data = lora_model(name, dropout)
    prefix, first, second, full = replay(model, batches_of(data, 4))
    names = [n.removeprefix("base_model.model.") for m in prefix.modules for n, x in model.named_modules() if x is m]
    below = MODELS[name][4]
    assert prefix.active, names
    assert below in names and prefix.read_later[names.index(below)]  # kept: read by the layers beside the adapter too
    torch.testing.assert_close(first, full, rtol=HVP_RTOL, atol=HVP_ATOL)
    torch.testing.assert_close(second, full, rtol=HVP_RTOL, atol=HVP_ATOL)


def test_the_fitted_basis_is_the_same_with_and_without_replay(monkeypatch, caplog):
    model, data = lora_model("bert")
    inf = hfi.Influence(model, batch_size=4, progress=False)
    with caplog.at_level(logging.INFO, logger="hf_influence"):
        replayed = inf.fit_arnoldi(data, rank=4, iterations=12)
    assert any(r.getMessage().startswith("Replaying the frozen prefix (") for r in caplog.records)
    monkeypatch.setattr(prefix_module, "prefix_modules", lambda *args: [])  # every pass runs the whole model
    full = inf.fit_arnoldi(data, rank=4, iterations=12)
    torch.testing.assert_close(replayed.eigenvalues, full.eigenvalues, rtol=0, atol=BASIS_ATOL)
    signs = torch.sign((replayed.eigenvectors * full.eigenvectors).sum(dim=1, keepdim=True))
    torch.testing.assert_close(replayed.eigenvectors * signs, full.eigenvectors, rtol=0, atol=BASIS_ATOL)


def test_lora_on_the_embeddings_leaves_nothing_to_replay_and_says_so(caplog):
    model, data = lora_model("bert", target_modules=["word_embeddings"], layers_to_transform=None)
    with caplog.at_level(logging.INFO, logger="hf_influence"):
        prefix, first, _, full = replay(model, batches_of(data, 4))
    assert not prefix.active and prefix.modules == []
    assert any("No frozen prefix to replay" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(first, full)


def test_a_replay_that_would_change_the_hvps_falls_back_with_the_reason(caplog):
    model, data = lora_model("bert")

    def scale_in_place(module, args):
        args[0].mul_(1.5)  # changes the kept hidden states entering layer 2 (torch.func refuses the replay)

    model.get_base_model().bert.encoder.layer[2].register_forward_pre_hook(scale_in_place)
    with caplog.at_level(logging.INFO, logger="hf_influence"):
        prefix, first, _, full = replay(model, batches_of(data, 4))
    assert prefix.modules and not prefix.active
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == prefix_module.__name__]
    assert len(warnings) == 1 and "every HVP pass runs the whole model" in warnings[0]
    assert "raised RuntimeError" in warnings[0] or "relative difference" in warnings[0]
    torch.testing.assert_close(first, full)
