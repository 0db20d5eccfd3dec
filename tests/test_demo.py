"""The regression demo (Sec. 3.1, Fig. 1): the rule's own loop with real-valued per-layer targets."""

from __future__ import annotations

import json

import pytest
import torch

from threefactor.cli import main
from threefactor.demos import (
    regression_rule,
    build_regression_network,
    center_neurons,
    poisson_input,
    regression_targets,
    run_regression,
)
from threefactor.model.surrogates import surrogate_derivative


def test_targets_are_a_ramp_a_fast_and_a_slow_sine():
    y = regression_targets(500)
    assert y.shape == (500, 3)
    assert y[0, 0] == 0 and torch.all(y[1:, 0] > y[:-1, 0])  # ramp
    crossings = [int(((y[:-1, k] < 0) & (y[1:, k] >= 0)).sum()) for k in (1, 2)]
    assert crossings[0] > crossings[1] >= 0  # the second target oscillates faster than the third


def test_poisson_input_is_fixed_by_the_seed_and_has_its_rate():
    a, b = poisson_input(100, 500, 50.0, seed=3), poisson_input(100, 500, 50.0, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, poisson_input(100, 500, 50.0, seed=4))
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    assert a.mean().item() == pytest.approx(0.05, abs=0.005)


def test_one_regression_step_is_eq8_times_surrogate_times_p():
    """The rule's autograd step equals the closed form: dW_ij = -lr G_i (Y - Yhat) sigma'(U_i) P_j."""
    torch.manual_seed(0)
    net = build_regression_network(n_inputs=6, hidden=5, layers=3, readout_scale=2.0, seed=1)
    x = (torch.rand(4, 6) < 0.5).float()
    targets = torch.randn(1, 4, 3, 1)
    lr = 0.1
    before = [layer.synapse.weight.detach().clone() for layer in net.layers]
    bias_before = [layer.synapse.bias.detach().clone() for layer in net.layers]
    # the same forward pass by hand, to read U, P and Y at the learning step (t = 3)
    with torch.no_grad():
        state = None
        for t in range(4):
            out, state = net(x[None, t], state)
    rule = regression_rule(net, torch.optim.SGD(net.parameters(), lr=lr), burn_in=3)
    rule.train_sequence(x[None], targets)
    for i, layer in enumerate(net.layers):
        g = net.readouts[i].g  # (1, N)
        err = (out.readouts[i] - targets[:, 3, i]) @ g  # Eq. 8: sum_k G_ki (Y_k - Yhat_k), (1, N)
        post = err * surrogate_derivative(out.membranes[i], "boxcar")  # (1, N)
        dw = post.t() @ state[i].p  # (N, inputs)
        torch.testing.assert_close(layer.synapse.weight.detach(), before[i] - lr * dw)
        torch.testing.assert_close(layer.synapse.bias.detach(), bias_before[i] - lr * post[0])


def test_centring_leaves_no_neuron_silent_or_always_on():
    x = poisson_input(100, 300, 50.0, seed=0)
    net = build_regression_network(hidden=64, seed=0)
    stats = center_neurons(net, x[:, None], skip_steps=30, target_mean=-1.0)
    for silent, rate in stats:
        assert silent < 0.05 and 0.05 < rate < 0.35


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "regression"
    torch.manual_seed(0)
    result = run_regression(out, hidden=128, duration_ms=200, epochs=12, seed=0, log=lambda s: None)
    return out, result


def test_every_layer_learns_its_own_target(small_demo):
    _, r = small_demo
    for layer, (final, initial, var) in enumerate(zip(r.mse, r.initial_mse, r.target_variance), 1):
        assert final < 0.3 * initial, (layer, final, initial)
        assert final < 0.7 * var, (layer, final, var)  # better than predicting the target's mean
    assert len(r.train_mse) == 12


def test_demo_writes_its_figure_and_numbers(small_demo):
    from matplotlib.image import imread

    out, r = small_demo
    png = out / "regression.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 800 and img[..., :3].std() > 0.05
    saved = json.loads((out / "regression.json").read_text())
    assert saved["mse"] == pytest.approx(r.mse) and saved["figure"] == str(png)


def test_demo_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["demo", "regression", "--epochs", "1", "--hidden", "16", "--duration-ms", "60",
                 "--out", str(out)]) == 0
    assert "final MSE per layer" in capsys.readouterr().out
    assert (out / "regression.png").exists() and (out / "regression.json").exists()
    assert main(["demo", "regression", "--hidden", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("threefactor: error:") and len(err.splitlines()) == 1
