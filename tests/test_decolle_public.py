"""threefactor against the authors' own code (PyPI ``decolle==0.2``, nmi-lab/decolle-public).

Their ``LenetDECOLLE`` and ``from_decolle`` of it get the same random input spikes in float64.
Per step: P, Q, R, U, S and the readouts; the weight gradients of one online step (closed form
and autograd); and the weights after 20 Adamax(0, 0.95) steps through their own
``decolle.utils.train`` against ``DecolleRule``. The oracle is installed by ``./dev test``
(tests/oracles.txt); without it these tests skip, and under CI=true a skip fails (conftest).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import yaml

from threefactor import DecolleRule, export_nir, from_decolle, from_nir, predict_sequence
from threefactor.model.decolle_public import DecolleImportError

pytestmark = pytest.mark.oracle

# name: LenetDECOLLE arguments. "pooled" is the paper's stack in miniature: conv layers
# pooled 2-1-2 and the dense layer of their params_nmnist.yml.
NETS = {
    "dense": dict(input_shape=[2, 5, 5], Nhid=[], Mhid=[24, 16], num_conv_layers=0,
                  num_mlp_layers=2),
    "conv": dict(input_shape=[2, 8, 8], Nhid=[4, 6], Mhid=[], kernel_size=[3], pool_size=[1],
                 num_conv_layers=2, num_mlp_layers=0),
    "pooled": dict(input_shape=[2, 16, 16], Nhid=[4, 6, 6], Mhid=[10], kernel_size=[3],
                   pool_size=[2, 1, 2], num_conv_layers=3, num_mlp_layers=1),
}
N_CLASSES = 5
BATCH = 6


@pytest.fixture(scope="module")
def decolle():
    """The authors' package, or a skip that says how to get it."""
    try:
        import decolle.base_model
        import decolle.init_functions
        import decolle.lenet_decolle_model
        import decolle.utils
    except Exception as err:  # noqa: BLE001 - any import failure: the oracle is absent
        pytest.skip(f"the authors' code decolle==0.2 is not importable ({type(err).__name__}: {err}); "
                    "`./dev test` installs it from tests/oracles.txt")
    return decolle


def spikes_in(name: str, steps: int, density: float = 0.05, seed: int = 0) -> torch.Tensor:
    shape = NETS[name]["input_shape"]
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand((BATCH, steps, *shape), generator=gen, dtype=torch.float64) < density).double()


def authors_net(decolle, name: str, seed: int = 0):
    """Their LenetDECOLLE in float64, initialised as their training script does (their
    init_parameters, then their LSUV on a batch of input), with readout dropout off."""
    from decolle.base_model import LIFLayer
    from decolle.lenet_decolle_model import LenetDECOLLE

    torch.manual_seed(seed)
    args = dict(NETS[name])
    net = LenetDECOLLE(out_channels=N_CLASSES, alpha=[0.97], beta=[0.92], alpharp=[0.65],
                       wrp=[1.0], dropout=[0.0], lc_ampl=0.5, lif_layer_type=LIFLayer,
                       method="rtrl", **args).double()
    with contextlib.redirect_stdout(io.StringIO()):  # their LSUV prints every iteration
        net.init_parameters(None)
        decolle.init_functions.init_LSUV(net, spikes_in(name, 40, density=0.2, seed=99))
    return net


def reset(net) -> None:
    for lif in net.LIF_layers:
        lif.state = None


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def state_difference(decolle, name: str, zero_bias: bool = False,
                     spike_function=None) -> tuple[float, float]:
    """Max |ours - theirs| over 30 steps of P, Q, R, U and the readouts of every layer (spikes
    must be equal: asserted here), and the mean spike rate over layers and steps.
    ``spike_function``: their neurons' ``sg_function`` instead of ``FastSigmoid``."""
    theirs = authors_net(decolle, name)
    if spike_function is not None:
        for lif in theirs.LIF_layers:
            lif.sg_function = spike_function
    if zero_bias:  # U = 0 exactly while P is still 0: spikes in ours only if U = 0 counts
        with torch.no_grad():
            for lif in theirs.LIF_layers:
                lif.base_layer.bias.zero_()
    ours = from_decolle(theirs)
    x = spikes_in(name, 30)
    reset(theirs)
    state, fired, worst = None, 0.0, 0.0
    with torch.no_grad():
        for t in range(x.shape[1]):
            s, r, u = theirs.step(x[:, t])
            previous = state
            out, state = ours(x[:, t], state)
            for i, lif in enumerate(theirs.LIF_layers):
                their_state = lif.state
                worst = max(worst, max_diff(state[i].p, their_state.P), max_diff(state[i].q, their_state.Q),
                            max_diff(out.membranes[i], u[i]), max_diff(out.readouts[i], r[i]))
                # their R at step t is computed from the previous step's spikes: -rho * our R
                # after step t - 1 (both zero at the start)
                our_r = torch.zeros_like(their_state.R) if previous is None else -previous[i].r
                worst = max(worst, max_diff(our_r, their_state.R))
                assert torch.equal(out.spikes[i], s[i]), f"layer {i}, step {t}: spikes differ"
                fired += out.spikes[i].mean().item()
    return worst, fired / (x.shape[1] * len(theirs.LIF_layers))


@pytest.mark.parametrize("name", list(NETS))
def test_every_state_equals_theirs_step_by_step(decolle, name):
    worst, rate = state_difference(decolle, name)
    assert worst <= 1e-12
    assert rate > 0.02, "too few spikes to test anything"


def test_a_membrane_of_exactly_zero_is_no_spike_as_in_theirs(decolle):
    worst, _ = state_difference(decolle, "pooled", zero_bias=True)
    assert worst <= 1e-12


def test_their_boxcar_neurons_convert_too(decolle):
    """Their SmoothStep spikes on U >= 0 with a boxcar derivative: ``boxcar``, spike_at_zero."""
    from decolle.base_model import smooth_step

    theirs = authors_net(decolle, "dense")
    for lif in theirs.LIF_layers:
        lif.sg_function = smooth_step
    ours = from_decolle(theirs)
    assert all(layer.surrogate == "boxcar" and layer.params.spike_at_zero for layer in ours.layers)
    worst, _ = state_difference(decolle, "pooled", zero_bias=True, spike_function=smooth_step)
    assert worst <= 1e-12


def their_gradients(decolle, theirs, x, labels):
    """Weight and bias gradients of their one online step at the last step of ``x``."""
    from decolle.base_model import DECOLLELoss

    loss = DECOLLELoss(net=theirs, loss_fn=[torch.nn.SmoothL1Loss()] * len(theirs), reg_l=[0.0] * len(theirs))
    target = torch.nn.functional.one_hot(labels, N_CLASSES).double()
    reset(theirs)
    with torch.no_grad():
        for t in range(x.shape[1] - 1):
            theirs.step(x[:, t])
    theirs.zero_grad(set_to_none=True)
    s, r, u = theirs.step(x[:, -1])
    sum(loss(s, r, u, target=target, mask=torch.ones_like(target), sum_=False)).backward()
    return [(lif.base_layer.weight.grad, lif.base_layer.bias.grad) for lif in theirs.LIF_layers]


def gradient_difference(decolle, name: str, closed_form: bool) -> float:
    """Max |ours - theirs| / max(1, max |theirs|) over the weight and bias gradients of every
    layer at one online step after 11 steps without learning."""
    theirs = authors_net(decolle, name)
    ours = from_decolle(theirs)
    x = spikes_in(name, 12, seed=3)
    labels = torch.arange(BATCH) % N_CLASSES
    expected = their_gradients(decolle, theirs, x, labels)
    rule = DecolleRule(ours, torch.optim.SGD(ours.parameters(), lr=0.0), burn_in=x.shape[1] - 1,
                       closed_form=closed_form)
    assert rule.uses_closed_form() == closed_form
    rule.train_sequence(x, labels)
    worst = 0.0
    for i, (layer, (gw, gb)) in enumerate(zip(ours.layers, expected)):
        assert gw.abs().max().item() > 0, f"layer {i} got no gradient: nothing to compare"
        for mine, their in ((layer.synapse.weight.grad, gw), (layer.synapse.bias.grad, gb)):
            worst = max(worst, max_diff(mine, their) / max(their.abs().max().item(), 1.0))
    return worst


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "autograd"])
@pytest.mark.parametrize("name", list(NETS))
def test_one_online_step_has_their_weight_gradients(decolle, name, closed_form):
    assert gradient_difference(decolle, name, closed_form) <= 1e-12


def adamax_difference(decolle, name: str, closed_form: bool) -> float:
    """Max |ours - theirs| over every weight and bias after 20 Adamax(0, 0.95) steps, theirs
    through their own ``decolle.utils.train``, ours through ``DecolleRule``."""
    from decolle.base_model import DECOLLELoss

    theirs = authors_net(decolle, name)
    ours = from_decolle(theirs)
    moved_from = [layer.synapse.weight.detach().clone() for layer in ours.layers]
    x = spikes_in(name, 20, seed=5)
    labels = torch.arange(BATCH) % N_CLASSES
    target = torch.nn.functional.one_hot(labels, N_CLASSES).double()

    their_opt = torch.optim.Adamax(theirs.get_trainable_parameters(), lr=1e-2, betas=(0.0, 0.95))
    loss = DECOLLELoss(net=theirs, loss_fn=[torch.nn.SmoothL1Loss()] * len(theirs), reg_l=[0.0] * len(theirs))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # their torch.tensor(tensor) copies warn
        decolle.utils.train([(x, target)], loss, theirs, their_opt, epoch=0, burnin=0, online_update=True)

    # Their net.init runs the first step once without learning before the loop starts at step 0
    # again: the same input, a burn-in of one repeated step (docs/decolle.md, "burn-in").
    rule = DecolleRule(ours, torch.optim.Adamax(ours.parameters(), lr=1e-2, betas=(0.0, 0.95)),
                       burn_in=1, closed_form=closed_form)
    rule.train_sequence(torch.cat([x[:, :1], x], 1), labels)
    worst = 0.0
    for i, (layer, lif) in enumerate(zip(ours.layers, theirs.LIF_layers)):
        assert max_diff(lif.base_layer.weight, moved_from[i]) > 1e-4, f"layer {i} did not learn"
        worst = max(worst, max_diff(layer.synapse.weight, lif.base_layer.weight),
                    max_diff(layer.synapse.bias, lif.base_layer.bias))
    return worst


@pytest.mark.parametrize("closed_form", [True, False], ids=["closed_form", "autograd"])
@pytest.mark.parametrize("name", list(NETS))
def test_twenty_adamax_steps_through_their_train_end_on_our_weights(decolle, name, closed_form):
    assert adamax_difference(decolle, name, closed_form) <= 1e-9


@pytest.mark.parametrize("name", list(NETS))
def test_state_dict_and_params_give_the_same_network_as_the_module(decolle, name, tmp_path):
    theirs = authors_net(decolle, name).float()
    params = {"alpha": [0.97], "beta": [0.92], "alpharp": [0.65], "dropout": [0.0],
              "pool_size": NETS[name].get("pool_size", [1]),
              "num_conv_layers": NETS[name]["num_conv_layers"]}
    path, params_file = tmp_path / "epoch00001.tar", tmp_path / "params.yml"
    torch.save({"epoch": 1, "model_state_dict": theirs.state_dict(), "optimizer_state_dict": {}}, path)
    params_file.write_text(yaml.safe_dump(params))
    from_module, from_file = from_decolle(theirs), from_decolle(path, params_file)
    assert [layer.params for layer in from_module.layers] == [layer.params for layer in from_file.layers]
    x = spikes_in(name, 15).float()
    sa = sb = None
    with torch.no_grad():
        for t in range(x.shape[1]):
            a, sa = from_module(x[:, t], sa)
            b, sb = from_file(x[:, t], sb)
            for ya, yb in zip(a.readouts, b.readouts):
                assert torch.equal(ya, yb)


def test_their_test_and_our_votes_give_the_same_accuracy(decolle):
    theirs = authors_net(decolle, "pooled")
    ours = from_decolle(theirs).eval()
    x = spikes_in("pooled", 20, density=0.1, seed=7)
    labels = torch.arange(BATCH) % N_CLASSES
    target = torch.nn.functional.one_hot(labels, N_CLASSES).double()
    loss = decolle.base_model.DECOLLELoss(net=theirs, loss_fn=[torch.nn.SmoothL1Loss()] * len(theirs),
                                          reg_l=[0.0] * len(theirs))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, their_acc = decolle.utils.test([(x, target.unsqueeze(1).expand(-1, x.shape[1], -1))], loss, theirs,
                                          burnin=0, print_error=False)
    # their net.init runs step 0 once before the loop votes over steps 0..T-1
    result = predict_sequence(ours, torch.cat([x[:, :1], x], 1), labels, burn_in=1)
    ours_acc = (result.votes.argmax(2) == labels).double().mean(1)
    assert ours_acc.tolist() == pytest.approx(list(their_acc), abs=1e-12)
    assert len(set(ours_acc.tolist())) > 1 or ours_acc[0] not in (0.0, 1.0), "a degenerate comparison"


def test_exported_to_nir_and_back_it_still_spikes_as_theirs(decolle, tmp_path):
    pytest.importorskip("nir", reason="the 'nir' package is not installed")
    theirs = authors_net(decolle, "pooled").float()
    path = tmp_path / "model.nir"
    export_nir(from_decolle(theirs), path, mode="exact", input_shape=NETS["pooled"]["input_shape"])
    back = from_nir(path)
    x = spikes_in("pooled", 30).float()
    reset(theirs)
    state = None
    with torch.no_grad():
        for t in range(x.shape[1]):
            s, r, _ = theirs.step(x[:, t])
            out, state = back(x[:, t], state)
            for i in range(len(s)):
                assert torch.equal(out.spikes[i], s[i]), f"layer {i}, step {t}"
                torch.testing.assert_close(out.readouts[i], r[i], rtol=0, atol=1e-5)


def test_wrong_decays_in_the_params_are_refused(decolle):
    theirs = authors_net(decolle, "dense")
    with pytest.raises(DecolleImportError, match="tau_m .* does not match the parameters' decay"):
        from_decolle(theirs.state_dict(), {"alpha": [0.9], "beta": [0.92], "dropout": [0.0]})


def test_models_with_other_dynamics_are_refused(decolle):
    from decolle.base_model import LIFLayerNonorm
    from decolle.lenet_decolle_model import LenetDECOLLE

    net = LenetDECOLLE(out_channels=3, input_shape=[1, 4, 4], Nhid=[], Mhid=[5], num_conv_layers=0,
                       num_mlp_layers=1, lif_layer_type=LIFLayerNonorm, lc_ampl=0.5)
    with pytest.raises(DecolleImportError, match="LIFLayerNonorm, whose dynamics differ"):
        from_decolle(net)
    with pytest.raises(DecolleImportError, match="needs the parameters"):
        from_decolle(net.state_dict())
