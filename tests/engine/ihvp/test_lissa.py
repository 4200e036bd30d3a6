"""LiSSA against exact s_test on the tiny trained BERT; divergence is caught."""

import pytest
import torch

import hf_influence as hfi
from hf_influence._utils.errors import LissaDivergenceError
from tests import utils

# λ_max(H) ≈ 0.12 and damping 0.05: s = 0.5 clears minibatch curvature; condition (0.17/0.026) needs ~100s of steps.
ADEQUATE = hfi.LissaConfig(scale=0.5, steps=300, repeats=2, batch_size=16, seed=0)


def test_lissa_s_test_correlates_with_exact(bert_oracle):
    inf = bert_oracle["inf"]
    s_test = inf.s_test(bert_oracle["test"], bert_oracle["train"], lissa=ADEQUATE)  # [n_test, P]
    exact = torch.linalg.solve(
        bert_oracle["hessian"] + utils.BERT_DAMPING * torch.eye(bert_oracle["hessian"].shape[0], dtype=torch.float64),
        bert_oracle["g_test"].T,
    ).T
    assert utils.pearson(s_test, exact) >= utils.PEARSON_FLOOR
    scores = s_test @ bert_oracle["g_train"].T
    assert utils.pearson(scores, bert_oracle["pairwise"]) >= utils.PEARSON_FLOOR


def test_scale_below_lambda_max_is_detected(bert_oracle):
    inf = bert_oracle["inf"]
    too_small = hfi.LissaConfig(scale=0.01, steps=200, batch_size=16)  # λ_max + λ ≈ 0.17
    with pytest.raises(LissaDivergenceError, match="Increase LissaConfig.scale"):
        inf.s_test(bert_oracle["test"].select(range(2)), bert_oracle["train"], lissa=too_small)


@pytest.mark.parametrize("field, value", [("scale", 0.0), ("steps", 0), ("repeats", 0), ("batch_size", 0), ("damping", -1.0)])
def test_config_rejects_impossible_values(field, value):
    with pytest.raises(ValueError, match=field):
        hfi.LissaConfig(**{field: value})
