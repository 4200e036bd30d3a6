"""LiSSA against exact s_test on the tiny trained BERT; divergence is caught."""

import math

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


def exact_s_test(bert_oracle):
    hessian = bert_oracle["hessian"]
    return torch.linalg.solve(hessian + utils.BERT_DAMPING * torch.eye(hessian.shape[0], dtype=torch.float64), bert_oracle["g_test"].T).T


def test_auto_lissa_correlates_with_exact(bert_oracle):
    inf = bert_oracle["inf"]
    resolved = inf.resolve_lissa(bert_oracle["train"], "auto")
    result = inf.solve_s_test(bert_oracle["test"], bert_oracle["train"], lissa=resolved)
    assert utils.pearson(result.solution.T, exact_s_test(bert_oracle)) >= utils.PEARSON_FLOOR
    chosen = result.config
    assert chosen.scale > resolved.spectrum.lambda_max + utils.BERT_DAMPING
    koh_liang = hfi.LissaConfig.koh_liang()
    assert 10 * result.hvps * chosen.batch_size <= koh_liang.steps * koh_liang.batch_size  # example-HVPs


def test_choose_config_follows_the_spectrum():
    from hf_influence.engine.ihvp.lissa import choose_lissa_config
    from hf_influence.engine.spectrum import Spectrum

    spectrum = Spectrum(lambda_max=1.0, lambda_max_error=0.01, trace=20.0, trace_stderr=0.0, hvps=0, lambda_min=-0.05, lambda_min_error=0.0)
    config = choose_lissa_config(spectrum, damping=0.1, num_examples=1000, target_error=1e-2, min_batch=16)
    assert config.batch_size == 20  # tr(H) / λ_max, above the floor
    margin = 1.1 + 2 * math.sqrt(20 / 20)
    assert config.scale == pytest.approx(min(2.0, margin) * 1.0 + 0.1)
    assert config.steps == math.ceil(2.1 / 0.05 * math.log(100.0))
    assert config.max_repeats == 16 and config.restarts == 1
    floor = choose_lissa_config(spectrum, damping=0.1, num_examples=1000, min_batch=500)  # the floor binds
    assert floor.batch_size == 500 and floor.scale == pytest.approx((1.1 + 2 * math.sqrt(20 / 500)) + 0.1)
    full = choose_lissa_config(spectrum, damping=0.1, num_examples=300, min_batch=500)
    assert full.batch_size == 300 and full.repeats == 1 and full.max_repeats is None
    assert full.scale == pytest.approx(1.05 + 0.01 + 0.1)  # full batch: only the estimate's residual as margin
    with pytest.raises(ValueError, match="damping > 0.05"):
        choose_lissa_config(spectrum, damping=0.01, num_examples=1000)


def test_fastif_converter_and_presets():
    from hf_influence.engine.ihvp.lissa import fastif_damping

    assert fastif_damping(5e-3, 1e4) == pytest.approx(50.0)
    assert hfi.LissaConfig.fastif().batch_size == 1 and hfi.LissaConfig.fastif().damping == pytest.approx(50.0)
    assert hfi.LissaConfig.koh_liang().steps == 10_000 and hfi.LissaConfig.koh_liang(damping=0.01).damping == 0.01


def test_divergence_restarts_with_larger_scale(bert_oracle):
    inf = bert_oracle["inf"]
    config = hfi.LissaConfig(scale=0.06, steps=50, batch_size=48, restarts=1)  # 4 x 0.06 > λ_max + λ ≈ 0.17
    result = inf.solve_s_test(bert_oracle["test"].select(range(3)), bert_oracle["train"], lissa=config)
    assert torch.isfinite(result.solution).all()
    assert result.config.scale == pytest.approx(0.24)
