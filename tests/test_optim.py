"""optim.fused_adam_step against torch.optim.Adam.step: the same update bit for bit, and a refusal (nothing
changed) wherever it does not apply."""

import copy

import pytest
import torch

from elbolab.optim import adam, fused_adam_step, step_optimizer

pytestmark = pytest.mark.skipif(getattr(torch, "_fused_adam_", None) is None, reason="torch has no fused Adam kernel")


def two_layer_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))


def backward(net: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=gen)
    out = net[1](net[0](x))
    out = net[2](out)  # net[3] gets no gradient: a parameter without grad is skipped by both
    out.square().sum().backward()


def paired(options: dict, groups=None):
    a, b = two_layer_net(), two_layer_net()
    opt_a = torch.optim.Adam(groups(a) if groups else a.parameters(), fused=True, **options)
    opt_b = torch.optim.Adam(groups(b) if groups else b.parameters(), fused=True, **options)
    return a, b, opt_a, opt_b


def assert_same(a, b, opt_a, opt_b) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("options", [{"lr": 1e-2}, {"lr": 3e-3, "weight_decay": 0.1, "betas": (0.8, 0.95),
                                                     "eps": 1e-6}])
def test_bit_for_bit_the_update_of_adam_step(options):
    a, b, opt_a, opt_b = paired(options)
    taken = []
    for step in range(6):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            backward(net, step)
        if step == 3:  # a learning-rate schedule changes the groups' lr between steps
            for opt in (opt_a, opt_b):
                opt.param_groups[0]["lr"] *= 0.5
        opt_a.step()
        taken.append(fused_adam_step(opt_b))
        if not taken[-1]:
            opt_b.step()
        assert_same(a, b, opt_a, opt_b)
    assert taken == [False] + [True] * 5  # the first step initialises the state through torch
    assert not any(torch.equal(p, q) for p, q in zip(a.parameters(), two_layer_net().parameters())
                   if p.grad is not None)


def test_several_groups_and_a_resumed_state():
    def groups(net):
        return [{"params": net[0].parameters()}, {"params": list(net[2].parameters()) + list(net[3].parameters()),
                                                  "lr": 5e-3}]

    a, b, opt_a, opt_b = paired({"lr": 1e-2}, groups)
    for step in range(3):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad(set_to_none=True)
            backward(net, step)
            step_optimizer(opt)
    assert_same(a, b, opt_a, opt_b)
    # a checkpoint loaded into a fresh optimiser: new state tensors, which the direct step must use
    c = copy.deepcopy(b)
    opt_c = torch.optim.Adam(groups(c), fused=True, lr=1e-2)
    opt_c.load_state_dict(opt_b.state_dict())
    for net, opt in ((a, opt_a), (c, opt_c)):
        opt.zero_grad(set_to_none=True)
        backward(net, 3)
    opt_a.step()
    assert fused_adam_step(opt_c)
    assert_same(a, c, opt_a, opt_c)


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.Adam(params, lr=1e-2),  # not fused
    lambda params: torch.optim.Adam(params, lr=1e-2, fused=True, amsgrad=True),
    lambda params: torch.optim.Adam(params, lr=1e-2, fused=True, maximize=True),
    lambda params: torch.optim.Adam(params, lr=torch.tensor(1e-2), fused=True),
    lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
    lambda params: torch.optim.SGD(params, lr=1e-2),
])
def test_refuses_what_it_does_not_cover_and_changes_nothing(make):
    net = two_layer_net()
    opt = make(net.parameters())
    backward(net, 0)
    opt.step()  # state exists from here
    opt.zero_grad(set_to_none=True)
    backward(net, 1)
    before = [p.detach().clone() for p in net.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    assert not fused_adam_step(opt)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert str(opt.state_dict()) == str(state_before)


def test_refuses_with_a_step_hook():
    net = two_layer_net()
    opt = adam(net.parameters(), {"lr": 1e-2})
    backward(net, 0)
    opt.step()
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    backward(net, 1)
    assert not fused_adam_step(opt)
    step_optimizer(opt)  # falls back to optimizer.step(), which runs the hook
    assert calls == [1]
