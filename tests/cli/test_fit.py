"""`hf-influence fit`: the saved basis and spectrum equal the Python API's; the config file records the run."""

import json

import torch
import transformers

import hf_influence as hfi
from tests import utils
from tests.cli.conftest import FIT

API_ATOL = 1e-10  # float64 model; the CLI loads eager attention, the API model runs SDPA's math kernel


def test_basis_and_spectrum_equal_the_api(trained_bert, fitted):
    model, train, _ = trained_bert
    inf = hfi.Influence(model, last_n_layers=1, damping=utils.BERT_DAMPING, batch_size=16, hessian_examples=FIT["hessian_examples"],
                        progress=False)
    hessian = inf.hessian_rows(train)  # --hessian_examples: the same seeded random subset as in Python (was: the first rows)
    expected = inf.fit_arnoldi(hessian, rank=FIT["rank"], iterations=FIT["iterations"])
    saved = hfi.ArnoldiBasis.load(fitted)
    torch.testing.assert_close(saved.eigenvalues, expected.eigenvalues, atol=API_ATOL, rtol=0)
    torch.testing.assert_close(saved.eigenvectors, expected.eigenvectors, atol=1e-8, rtol=0)
    assert saved.fingerprint == inf.selection.fingerprint(model)

    config = json.loads((fitted / "influence_config.json").read_text())
    spectrum = inf.spectrum(hessian, iterations=FIT["spectrum_iterations"], trace_matvecs=FIT["trace_matvecs"])
    assert abs(config["fit"]["result"]["spectrum"]["lambda_max"] - spectrum.lambda_max) < API_ATOL
    assert abs(config["fit"]["result"]["spectrum"]["trace"] - spectrum.trace) < 1e-8
    assert config["fit"]["result"]["eigenvalues"] == saved.eigenvalues.tolist()
    assert config["fit"]["settings"]["rank"] == FIT["rank"] and config["fit"]["settings"]["damping"] == utils.BERT_DAMPING
    assert config["model"]["fingerprint"] == inf.selection.fingerprint(model)
    assert config["model"]["param_names"] == list(inf.selection.names)
    assert config["versions"]["torch"] == torch.__version__ and config["versions"]["transformers"] == transformers.__version__
