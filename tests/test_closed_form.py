"""The closed-form DECOLLE step (``rule.closed_form``, the default) is the autograd step, faster.

It must follow the autograd path update for update (float64) for every surrogate, loss,
ordering, pooling, dense layer, feedback alignment, regulariser and dropout; the lean
``threefactor.run.optim.Adamax`` must be torch's Adamax; and it must keep no graph and a state that
does not grow with T.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from threefactor.config import LayerConfig, NetworkConfig, NeuronConfig
from threefactor.model.layers import DecolleLayer, LocalReadout
from threefactor.model.network import build_network
from threefactor.run.optim import Adamax
from threefactor.rules import LOSSES, DecolleRule, ErrorTrigger

CASES = [  # surrogate, loss, ordering, feedback alignment, reg1, reg2, dropout, variant
    ("boxcar", "mse", "current", False, 0.0, 0.0, 0.0, "after_pool"),
    ("fast_sigmoid", "smooth_l1", "lagged", False, 0.0, 0.0, 0.3, "after_pool"),
    ("sigmoid", "cross_entropy", "current", True, 0.2, 0.3, 0.0, "after_pool"),
    ("boxcar", "smooth_l1", "lagged", True, 0.1, 0.5, 0.5, "after_pool"),
    ("fast_sigmoid", "smooth_l1", "lagged", False, 0.0, 0.0, 0.3, "authors"),
    ("boxcar", "mse", "current", True, 0.1, 0.2, 0.0, "before_pool"),
]
# the neuron's refractory placement and threshold, and the readout bias
VARIANTS = {
    "after_pool": dict(refractory="after_pool", spike_at_zero=True, readout_bias=False),
    "before_pool": dict(refractory="before_pool", spike_at_zero=True, readout_bias=False),
    "authors": dict(refractory="before_pool", spike_at_zero=False, readout_bias=True),
}


def _cfg(surrogate, ordering="current", fa=False, dropout=0.0, layers=None, variant="after_pool") -> NetworkConfig:
    v = dict(VARIANTS[variant])
    readout_bias = v.pop("readout_bias")
    return NetworkConfig(
        layers=layers or [LayerConfig("conv", 3, 3, 2), LayerConfig("conv", 4, 3, 1),
                          LayerConfig("conv", 4, 3, 2), LayerConfig("dense", 6)],
        neuron=NeuronConfig(alpha=0.9, beta=0.8, ordering=ordering, **v),
        surrogate=surrogate, readout_scale=2.0, dropout=dropout, feedback_alignment=fa, init="default",
        readout_bias=readout_bias,
    )


def _pair(cfg: NetworkConfig, shape=(2, 12, 12), make_opt=None):
    net = build_network(cfg, shape, 4, seed=0).double()
    with torch.no_grad():  # a larger gain so that every layer spikes and learns
        for layer in net.layers:
            layer.synapse.weight.mul_(3.0)
            layer.synapse.bias.add_(0.1)
    twin = copy.deepcopy(net)
    make_opt = make_opt or (lambda n: Adamax(n.parameters(), lr=0.01, betas=(0.0, 0.95)))
    return net, make_opt(net), twin, make_opt(twin)


def _inputs(T, B=3, shape=(2, 12, 12), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(B, T, *shape, generator=gen) < 0.3).double()
    return x, torch.randint(0, 4, (B,), generator=gen)


@pytest.mark.parametrize("surrogate,loss,ordering,fa,reg1,reg2,dropout,variant", CASES)
def test_closed_form_step_follows_autograd_update_for_update(surrogate, loss, ordering, fa, reg1, reg2, dropout,
                                                              variant):
    net, opt, twin, twin_opt = _pair(_cfg(surrogate, ordering, fa, dropout, variant=variant))
    fast = DecolleRule(net, opt, loss, reg1, reg2, burn_in=2, closed_form=True)
    slow = DecolleRule(twin, twin_opt, loss, reg1, reg2, burn_in=2, closed_form=False)
    assert fast.uses_closed_form() and not slow.uses_closed_form()
    before = [p.detach().clone() for p in net.parameters()]
    for seq in range(3):
        x, labels = _inputs(7, seed=seq)
        torch.manual_seed(seq)  # the same dropout masks: both paths draw them in the same order
        a = fast.train_sequence(x, labels)
        torch.manual_seed(seq)
        b = slow.train_sequence(x, labels)
        assert torch.equal(a.votes, b.votes) and torch.equal(a.rates, b.rates)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    moved = 0.0
    for (name, p), q, p0 in zip(net.named_parameters(), twin.parameters(), before):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"{name} differs")
        moved += (p - p0).abs().sum().item()
    assert moved > 0.1  # the weights did learn: the comparison is not between two idle networks


def test_closed_form_with_sgd_and_weight_decay_uses_the_optimiser_as_given():
    def make(n):
        return torch.optim.SGD(n.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)

    net, opt, twin, twin_opt = _pair(_cfg("fast_sigmoid"), make_opt=make)
    x, labels = _inputs(6)
    DecolleRule(net, opt, "smooth_l1", closed_form=True).train_sequence(x, labels)
    DecolleRule(twin, twin_opt, "smooth_l1", closed_form=False).train_sequence(x, labels)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("betas,wd,compile", [((0.0, 0.95), 0.0, False), ((0.9, 0.999), 0.01, False),
                                              ((0.0, 0.95), 0.01, True)])
def test_lean_adamax_is_torch_adamax(betas, wd, compile):
    """Bit for bit; compiled (beta1 = 0: one fused pass), to rounding."""
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5, 3, 3, 3), (5,), (7, 4))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_a = Adamax(a, lr=0.01, betas=betas, weight_decay=wd, compile=compile)
    opt_b = torch.optim.Adamax(b, lr=0.01, betas=betas, weight_decay=wd, foreach=True)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, 4, 0.5)
    hooked = []
    opt_a.register_step_post_hook(lambda o, args, kwargs: hooked.append(1))
    for step in range(12):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        if step == 8:  # a parameter without gradient is left alone, as torch does
            a[2].grad = b[2].grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. the scheduler's "step() before optimizer.step()"
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.compile's own
            opt_a.step()
            sched.step()
        opt_b.step()
        opt_b.param_groups[0]["lr"] = opt_a.param_groups[0]["lr"]
        for p, q in zip(a, b):
            if compile:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(p, q)
    assert len(hooked) == 12 and opt_a.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    assert compile is (opt_a._compiled_update not in (None, False))  # compiled, no fallback
    # the state is torch's own: a checkpoint of one loads into the other
    opt_b.load_state_dict(opt_a.state_dict())
    for k in ("step", "exp_avg", "exp_inf"):
        assert torch.equal(opt_a.state[a[0]][k], opt_b.state[b[0]][k])


def _saved_during(rule, x, labels) -> int:
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rule.train_sequence(x, labels)
    return count[0]


def test_closed_form_keeps_no_graph_and_its_memory_does_not_grow_with_t():
    sizes = []
    for T in (10, 100):
        net, opt, _, _ = _pair(_cfg("boxcar"))
        rule = DecolleRule(net, opt, "smooth_l1", burn_in=2)
        x, labels = _inputs(T)
        assert _saved_during(rule, x, labels) == 0  # nothing is kept for a backward pass
        sizes.append(sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)))
        assert all(p.grad is None or p.grad.grad_fn is None for p in net.parameters())
    assert sizes[0] == sizes[1] > 0


def test_closed_form_is_taken_only_where_it_applies():
    net = build_network(_cfg("boxcar"), (2, 12, 12), 4)
    opt = torch.optim.Adamax(net.parameters())
    assert DecolleRule(net, opt).uses_closed_form()
    assert not DecolleRule(net, opt, closed_form=False).uses_closed_form()
    assert not DecolleRule(net, opt, error_trigger=ErrorTrigger(threshold=0.1)).uses_closed_form()
    lif = build_network(NetworkConfig(layers=[LayerConfig("dense", 5)], neuron_model="lif"), (8,), 3)
    assert not DecolleRule(lif, torch.optim.Adamax(lif.parameters())).uses_closed_form()
    net.layers[0].synapse.padding_mode = "circular"  # a synapse the closed form does not model
    assert not DecolleRule(net, opt).uses_closed_form()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fa", [False, True])
def test_readout_input_grad_is_autograd_in_the_input_layout(channels_last, fa):
    gen = torch.Generator().manual_seed(0)
    readout = LocalReadout(4 * 3 * 5, 6, 2.0, fa, gen).double()
    s = torch.rand(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    if channels_last:
        s = s.contiguous(memory_format=torch.channels_last)
    s.requires_grad_(True)
    grad_y = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    readout(s).backward(grad_y)
    got = readout.input_grad(grad_y, s.detach())
    torch.testing.assert_close(got, s.grad)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # G is cached in the layout of the input; changing G (e.g. loading a state) renews the cache
    with torch.no_grad():  # (after .double() h is its own tensor even without FA)
        readout.g.mul_(2.0)
        readout.h.mul_(2.0)
    torch.testing.assert_close(readout(s.detach()), s.detach().flatten(1) @ readout.g.t())
    torch.testing.assert_close(readout.input_grad(grad_y, s.detach()), 2 * got)


@pytest.mark.parametrize("loss", LOSSES)
def test_closed_form_trains_in_float32_like_autograd(loss):
    """In float32 the two paths round differently; over a sequence they stay within 1e-4."""
    net, opt, twin, twin_opt = _pair(_cfg("fast_sigmoid", "lagged", dropout=0.2))
    net.float(), twin.float()
    x, labels = _inputs(8)
    torch.manual_seed(1)
    DecolleRule(net, opt, loss, closed_form=True).train_sequence(x.float(), labels)
    torch.manual_seed(1)
    DecolleRule(twin, twin_opt, loss, closed_form=False).train_sequence(x.float(), labels)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_the_closed_form_runs_no_layer_hooks_and_reports_the_same_rates():
    """The closed form never calls a layer's forward, so the layers' hooks do not run (only the
    burn-in steps run the network's forward); ``closed_form=False`` runs them at every step. The
    firing rates come back in the result either way, equal."""
    net, opt, twin, twin_opt = _pair(_cfg("boxcar"))
    seen = {0: [], 1: []}
    for k, n in enumerate((net, twin)):
        n.layers[2].register_forward_hook(lambda m, inp, out, k=k: seen[k].append(out[0].s.clone()))
    x, labels = _inputs(6)
    a = DecolleRule(net, opt, "mse", burn_in=2, closed_form=True).train_sequence(x, labels)
    b = DecolleRule(twin, twin_opt, "mse", burn_in=2, closed_form=False).train_sequence(x, labels)
    assert len(seen[0]) == 2 and len(seen[1]) == 6
    assert all(torch.equal(p, q) for p, q in zip(seen[0], seen[1]))  # the burn-in steps
    assert torch.equal(a.rates, b.rates) and a.rates.sum() > 0
    # layer 2's rate is the mean of the spikes its hook saw in the autograd path
    assert a.rates[2].item() == pytest.approx(torch.stack(seen[1]).mean().item(), rel=1e-12)


class _DoubledStep(DecolleLayer):
    """A DecolleLayer subclass with its own step: the closed form does not compute it."""

    def forward(self, x, state=None):
        out, state = super().forward(x, state)
        return out._replace(u=2 * out.u), state


def test_a_layer_that_overrides_the_step_goes_through_autograd():
    net = build_network(_cfg("boxcar"), (2, 12, 12), 4)
    opt = torch.optim.Adamax(net.parameters())
    assert net.supports_closed_form() and DecolleRule(net, opt).uses_closed_form()
    layer = net.layers[1]
    net.layers[1] = _DoubledStep(layer.synapse, layer.params, layer.pool.kernel_size if layer.pool else 1,
                                 layer.surrogate)
    assert not net.layers[1].supports_closed_form() and not DecolleRule(net, opt).uses_closed_form()
    assert all(n.supports_closed_form() for i, n in enumerate(net.layers) if i != 1)


def test_a_synapse_or_pool_the_closed_form_does_not_model_sends_the_layer_to_autograd():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    for change in (lambda n: setattr(n.layers[0].synapse, "padding", "same"),
                   lambda n: setattr(n.layers[0].pool, "stride", 1),
                   lambda n: setattr(n.layers[0].pool, "ceil_mode", True),
                   lambda n: setattr(n.layers[3], "synapse", Scaled(4 * 3 * 3, 6))):
        net = build_network(_cfg("boxcar"), (2, 12, 12), 4)
        change(net)
        assert not net.supports_closed_form()
        assert not DecolleRule(net, torch.optim.Adamax(net.parameters())).uses_closed_form()


def test_optimiser_step_hooks_are_honoured():
    """Distributed training synchronises in optimiser step hooks: they must run at every step."""
    net, opt, _, _ = _pair(_cfg("boxcar"))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(1))
    x, labels = _inputs(5)
    DecolleRule(net, opt, "mse", burn_in=1).train_sequence(x, labels)
    assert len(calls) == 4


def test_lean_adamax_with_one_group_per_layer_is_torch_adamax():
    """The trainer makes one parameter group per layer (layer_lr_scale); equal groups share calls."""
    gen = torch.Generator().manual_seed(1)
    shapes = ((4, 2), (4,), (3, 4), (3,))
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]

    def groups(ps):
        return [{"params": ps[:2], "lr": 0.01}, {"params": ps[2:], "lr": 0.01},
                {"params": [], "lr": 0.5}]

    opt_a = Adamax(groups(a), betas=(0.0, 0.95))
    opt_b = torch.optim.Adamax(groups(b), betas=(0.0, 0.95))
    for step in range(6):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        if step == 3:
            opt_a.param_groups[1]["lr"] = opt_b.param_groups[1]["lr"] = 0.002  # groups part ways
        opt_a.step()
        opt_b.step()
        assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("variant", ["after_pool", "authors"])
def test_compiled_closed_form_is_the_eager_closed_form(variant):
    """``rule.compile``: the same math through torch.compile (fused kernels round differently),
    the same dropout draws, the same spikes (their rates, counted per layer)."""
    net, opt, twin, twin_opt = _pair(_cfg("fast_sigmoid", "lagged", dropout=0.3, variant=variant))
    net.float(), twin.float()
    compiled = DecolleRule(net, opt, "smooth_l1", burn_in=1, compile=True)
    eager = DecolleRule(twin, twin_opt, "smooth_l1", burn_in=1)
    for seq in range(2):
        x, labels = _inputs(6, seed=seq)
        torch.manual_seed(seq)
        a = compiled.train_sequence(x.float(), labels)
        torch.manual_seed(seq)
        b = eager.train_sequence(x.float(), labels)
        assert torch.equal(a.votes, b.votes) and torch.equal(a.rates, b.rates)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert compiled._compiled not in (None, False)  # it did compile, and did not fall back
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_a_compiled_step_applies_the_lean_adamax_update_in_its_own_graph():
    """With the lean Adamax the compiled step updates the weights itself (no ``step`` call), to
    the weights and optimiser state of the same compiled step followed by torch's Adamax, also
    after a learning rate changes; a step hook makes it call ``step`` again."""
    net, opt, twin, _ = _pair(_cfg("fast_sigmoid", dropout=0.3))
    net.float(), twin.float()
    twin_opt = torch.optim.Adamax(twin.parameters(), lr=0.01, betas=(0.0, 0.95), foreach=True)
    stepped = []
    step = opt.step
    opt.step = lambda *a, **k: (stepped.append(1), step(*a, **k))[1]
    fused = DecolleRule(net, opt, "smooth_l1", burn_in=1, compile=True)
    plain = DecolleRule(twin, twin_opt, "smooth_l1", burn_in=1, compile=True)
    for seq in range(3):
        if seq == 2:
            opt.param_groups[0]["lr"] = twin_opt.param_groups[0]["lr"] = 0.004
        x, labels = _inputs(6, seed=seq)
        torch.manual_seed(seq)
        a = fused.train_sequence(x.float(), labels)
        torch.manual_seed(seq)
        b = plain.train_sequence(x.float(), labels)
        assert torch.equal(a.votes, b.votes)
        for p, q in zip(net.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not stepped and fused._compiled not in (None, False)
    mine, torchs = opt.state_dict()["state"], twin_opt.state_dict()["state"]
    for k in mine:
        assert mine[k]["step"] == torchs[k]["step"] == 15  # 3 sequences of 6 steps, 1 of burn-in
        torch.testing.assert_close(mine[k]["exp_inf"], torchs[k]["exp_inf"], rtol=1e-5, atol=1e-7)
        assert torch.equal(mine[k]["exp_avg"], list(net.parameters())[k].grad)
    opt.register_step_post_hook(lambda *args: None)
    x, labels = _inputs(3)
    fused.train_sequence(x.float(), labels)
    assert len(stepped) == 2  # the steps after the burn-in, each through step() and its hooks


def test_compile_failure_falls_back_to_the_eager_closed_form(monkeypatch):
    """No C++ compiler, an inductor bug: one warning, and training goes on, exactly as eager."""

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net, _, twin, twin_opt = _pair(_cfg("boxcar", dropout=0.2))
    opt = Adamax(net.parameters(), lr=0.01, betas=(0.0, 0.95), compile=True)
    x, labels = _inputs(5)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning) as caught:
        a = DecolleRule(net, opt, "mse", compile=True).train_sequence(x, labels)
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 2, said  # one each, not one per step
    assert said[0].startswith("Adamax(compile=True): torch.compile failed (RuntimeError: InductorError: "
                              "no working C++ compiler found); the update continues eagerly")
    assert said[1].startswith("rule.compile: torch.compile failed (RuntimeError: InductorError: "
                              "no working C++ compiler found); training continues")
    torch.manual_seed(0)
    b = DecolleRule(twin, twin_opt, "mse").train_sequence(x, labels)
    assert torch.equal(a.votes, b.votes) and torch.equal(a.loss, b.loss)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
