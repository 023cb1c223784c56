"""Every propagation rule of the exact decomposition preserves the sum and is linear in each component."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from cliptrace.explain import rules

BATCH, SOURCES, POSITIONS, WIDTH, HEADS = 2, 5, 3, 8, 2


def components(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SOURCES, POSITIONS, WIDTH, generator=generator, dtype=torch.float64)


def random_module(module: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return module.double()


def attention_probabilities(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(BATCH, HEADS, POSITIONS, POSITIONS, generator=generator, dtype=torch.float64)
    return scores.softmax(-1)


def reference_attention(values: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Attention output written head by head with explicit loops."""
    out = torch.zeros_like(values)
    head_width = WIDTH // HEADS
    for b in range(BATCH):
        for h in range(HEADS):
            columns = slice(h * head_width, (h + 1) * head_width)
            for n in range(POSITIONS):
                for m in range(POSITIONS):
                    out[b, n, columns] += probabilities[b, h, n, m] * values[b, m, columns]
    return out


LINEAR = random_module(nn.Linear(WIDTH, WIDTH))
NORM = random_module(nn.LayerNorm(WIDTH, eps=1e-5))
FROZEN_FULL = components(99).sum(1)  # the hidden state the frozen state is taken from in the linearity tests
PROBABILITIES = attention_probabilities(3)


def gate_case(name: str) -> tuple[Callable, Callable, Callable]:
    def rule(c: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return rules.gate(c, rules.activation_gate(full, name))
    return rule, ACT2FN[name], lambda c: rule(c, FROZEN_FULL)


# name -> (rule applied with the state of its own sum, reference op on the sum, rule with a fixed frozen state)
CASES: dict[str, tuple[Callable, Callable, Callable]] = {
    "linear": (lambda c: rules.linear(c, LINEAR.weight, LINEAR.bias), LINEAR,
               lambda c: rules.linear(c, LINEAR.weight, LINEAR.bias)),
    "layer_norm": (lambda c: rules.layer_norm(c, NORM, rules.layer_norm_sigma(c.sum(1), NORM)), NORM,
                   lambda c: rules.layer_norm(c, NORM, rules.layer_norm_sigma(FROZEN_FULL, NORM))),
    "attention": (lambda c: rules.attention_values(c, PROBABILITIES),
                  lambda x: reference_attention(x, PROBABILITIES),
                  lambda c: rules.attention_values(c, PROBABILITIES)),
    "normalize": (lambda c: rules.scale_by_norm(c, c.sum(1).norm(dim=-1, keepdim=True)),
                  lambda x: F.normalize(x, dim=-1),
                  lambda c: rules.scale_by_norm(c, FROZEN_FULL.norm(dim=-1, keepdim=True))),
}
for _name in ("quick_gelu", "gelu", "gelu_new", "relu"):
    _rule, _reference, _frozen = gate_case(_name)
    CASES[_name] = (lambda c, rule=_rule: rule(c, c.sum(1)), _reference, _frozen)


@pytest.mark.parametrize("name", CASES)
def test_rule_preserves_the_sum(name):
    rule, reference, _ = CASES[name]
    c = components(0)
    with torch.no_grad():
        torch.testing.assert_close(rule(c).sum(1), reference(c.sum(1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_rule_is_linear_in_each_component_given_the_frozen_state(name):
    _, _, frozen = CASES[name]
    a, b = components(1), components(2)
    with torch.no_grad():
        zero = frozen(torch.zeros_like(a))  # only the constant source may get something from nothing: a bias
        assert (zero[:, :-1] == 0).all()
        torch.testing.assert_close(frozen(2.5 * a - 0.5 * b), 2.5 * frozen(a) - 0.5 * frozen(b) - (1.0 * zero),
                                   rtol=1e-12, atol=1e-12)
        # Output s depends on input s alone.
        moved = a.clone()
        moved[:, 1] += b[:, 1]
        changed = frozen(moved) != frozen(a)
        assert changed[:, 1].any()
        assert not changed[:, [0, 2, 3, 4]].any()


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="no exact gate"):
        rules.activation_gate(torch.zeros(3), "silu_squared")
