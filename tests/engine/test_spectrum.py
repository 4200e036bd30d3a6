"""Spectrum estimates against the explicit Hessian of the tiny trained BERT (within 5%)."""

import dataclasses

import pytest
import torch

import hf_influence as hfi
from hf_influence.engine.spectrum import Spectrum

REL = 0.05


@pytest.fixture(scope="module")
def explicit(bert_oracle):
    values = torch.linalg.eigvalsh(bert_oracle["hessian"])
    return {"max": float(values[-1]), "min": float(values[0]), "trace": float(values.sum())}


@pytest.mark.parametrize("trace_estimator, matvecs", [("hutch++", 30), ("hutchinson", 60)])
def test_lanczos_and_trace_within_five_percent(bert_oracle, explicit, trace_estimator, matvecs):
    spectrum = bert_oracle["inf"].spectrum(bert_oracle["train"], iterations=30, trace_estimator=trace_estimator, trace_matvecs=matvecs)
    assert abs(spectrum.lambda_max - explicit["max"]) <= REL * explicit["max"]
    assert abs(spectrum.lambda_max - explicit["max"]) <= spectrum.lambda_max_error + 1e-6 * explicit["max"]  # a bound, up to rounding
    assert abs(spectrum.trace - explicit["trace"]) <= REL * explicit["trace"]
    assert abs(spectrum.trace - explicit["trace"]) <= 4 * spectrum.trace_stderr + 1e-9
    assert spectrum.hvps == 30 + matvecs
    assert spectrum.lambda_min is not None and spectrum.lambda_min < 0  # the trained tiny BERT is non-convex here
    assert spectrum.lambda_min >= explicit["min"] - 1e-9  # Ritz values lie inside the spectrum


def test_lanczos_bottom_converges_with_more_steps(bert_oracle, explicit):
    spectrum = bert_oracle["inf"].spectrum(bert_oracle["train"], iterations=120, trace_matvecs=3)
    assert abs(spectrum.lambda_min - explicit["min"]) <= REL * abs(explicit["min"])
    assert spectrum.min_damping == pytest.approx(-spectrum.lambda_min)


def test_power_iteration(bert_oracle, explicit):
    spectrum = bert_oracle["inf"].spectrum(bert_oracle["train"], method="power", iterations=200)
    assert abs(spectrum.lambda_max - explicit["max"]) <= REL * explicit["max"]
    assert spectrum.lambda_min is None and spectrum.min_damping is None


def test_subset_estimate_is_seeded(bert_oracle):
    oracle = bert_oracle["inf"]  # the Hessian rows are a seeded subset of hessian_examples rows, for every Hessian pass
    inf = hfi.Influence.from_config(oracle.model, dataclasses.replace(oracle.config, hessian_examples=20), task=oracle.task, progress=False)
    first = inf.spectrum(bert_oracle["train"], iterations=10, trace_matvecs=6)
    assert first == inf.spectrum(bert_oracle["train"], iterations=10, trace_matvecs=6)


def test_effective_rank():
    assert Spectrum(lambda_max=2.0, lambda_max_error=0.0, trace=10.0, trace_stderr=0.0, hvps=1).effective_rank == 5.0
