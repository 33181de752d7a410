"""Gradients with quantized saved activations against an unquantized backward on a real HF LLaMA.

Bounds are derived from the bit-width: ``eps_b`` is the relative RMS quantization error of the
tensors the model saves at ``b`` bits (measured on the same batch, see
``helpers.saved_activation_error``; ~0.003 / 0.06 / 0.28 for 8 / 4 / 2 bits with groups of 128).
Quantization noise in the saved tensors becomes gradient noise of the same order: averaged over
parameters the relative gradient error is ~2x ``eps_b`` (measured, fp32 and bf16), and the worst
parameter, a query/key projection, ~5x (softmax backward ``P * (dP - rowsum(dO * O))`` cancels, which
amplifies errors in v and the attention output). So the mean must stay within ``MEAN_K * eps_b``,
every parameter within ``MAX_K * eps_b``, and the mean be at least ``eps_b / 4`` (quantization
really happened).
"""

from __future__ import annotations

import pytest
import torch

from agoq_ds.config import ActivationConfig
from agoq_ds.testing.models import build_llama
from tests.activation.act_helpers import (
    cosines,
    lm_step,
    quantized_grads,
    rel_errors,
    saved_activation_error,
    text_batch,
)

MEAN_K = 3.0
"""Allowed amplification of the saved-activation error into the mean relative gradient error."""
MAX_K = 7.0
"""Allowed amplification into the worst parameter's relative gradient error."""


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def setup(request):
    torch.manual_seed(0)
    dtype = request.param
    model = build_llama("tiny", dtype=dtype).train()
    ids = text_batch(batch=2, seq=64)
    ref = lm_step(model, ids)
    results = {}
    eps = {}
    for name, cfg in {
        "uniform8": ActivationConfig(policy="uniform", default_bits=8),
        "agoq": ActivationConfig(),
        "uniform4": ActivationConfig(policy="uniform", default_bits=4),
        "uniform2": ActivationConfig(policy="uniform", default_bits=2),
    }.items():
        grads, quantizer = quantized_grads(model, ids, cfg)
        results[name] = (rel_errors(ref, grads), cosines(ref, grads), quantizer.stats())
    for bits in (8, 4, 2):
        eps[bits] = saved_activation_error(model, ids, bits, 128, 4096)
    return dtype, results, eps


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


@pytest.mark.parametrize("name,bits", [("uniform8", 8), ("uniform4", 4)])
def test_gradient_error_within_bit_width_bound(setup, name, bits):
    dtype, results, eps = setup
    rel, _, stats = results[name]
    slack = 0.002 if dtype == torch.bfloat16 else 0.0  # two bf16 backwards differ by rounding alone
    worst = max(rel, key=rel.get)
    assert _mean(rel) <= MEAN_K * eps[bits] + slack, f"{name}: mean rel error {_mean(rel):.4f}, eps {eps[bits]:.4f}"
    assert rel[worst] <= MAX_K * eps[bits] + slack, f"{name}: {worst} rel error {rel[worst]:.4f}, eps {eps[bits]:.4f}"
    assert _mean(rel) >= eps[bits] / 4, f"{name}: error {_mean(rel):.2e} implausibly small for {bits} bits"
    assert stats["avg_bits"] < bits + 1.5  # scales + exact statistics


def test_eight_bit_is_nearly_exact(setup):
    _, results, _ = setup
    rel, cos, _ = results["uniform8"]
    assert min(cos.values()) > 0.999
    assert _mean(rel) < 0.01


def test_four_bit_close_and_agoq_as_exact_as_8_bits_at_fewer_bits(setup):
    """agoq stores every tensor it does not rebuild at 8 bits (``DEFAULT_CLASS_BITS``), so its gradients
    are uniform 8-bit's to rounding (its bits per element: ``test_activation_quantizer``)."""
    _, results, _ = setup
    assert min(results["uniform4"][1].values()) > 0.95
    assert min(results["agoq"][1].values()) > 0.999
    agoq, uniform8, uniform4 = (_mean(results[k][0]) for k in ("agoq", "uniform8", "uniform4"))
    assert agoq <= uniform8 * 1.01 < uniform4


def test_two_bit_measurably_worse(setup):
    _, results, eps = setup
    rel2, cos2, _ = results["uniform2"]
    rel4, _, _ = results["uniform4"]
    assert _mean(rel2) > 3 * _mean(rel4)
    assert min(cos2.values()) < 0.9
    # The bounds discriminate: 2-bit gradients break the 4-bit bounds.
    assert max(rel2.values()) > MAX_K * eps[4] and _mean(rel2) > MEAN_K * eps[4]


def test_first_forward_is_exact():
    """Quantization only changes backward: the loss of a quantized forward is bit-identical."""
    model = build_llama("tiny").train()
    ids = text_batch()
    ref = model(input_ids=ids, labels=ids).loss
    from agoq_ds.activation import ActivationQuantizer

    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=2)).install()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        quantizer.on_step_end()
        assert torch.equal(loss, ref)
    quantizer.remove()


def test_log_probabilities_are_stored_as_probabilities():
    """Cross-entropy saves log-probabilities, which backward exponentiates; with confident logits
    (range ~[-40, 0]) an 8-bit code in log space would be off by ~e^0.15 in every probability."""

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(64, 512)

        def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.proj(x), target)

    torch.manual_seed(0)
    model = Head()
    with torch.no_grad():
        model.proj.weight.mul_(30)
    x = torch.randn(256, 64)
    target = model.proj(x).argmax(-1)

    def grad() -> torch.Tensor:
        model.zero_grad()
        model(x, target).backward()
        return model.proj.weight.grad.clone()

    from agoq_ds.activation import ActivationQuantizer

    exact = grad()
    quantizer = ActivationQuantizer(model, ActivationConfig(policy="uniform", default_bits=8)).install()
    for _ in range(2):
        got = grad()
        quantizer.on_step_end()
    quantizer.remove()
    assert quantizer._current().by_class["other"].quantized_numel == 256 * (64 + 512)  # x and log-probs
    assert float((got - exact).norm() / exact.norm()) < 0.02


def test_stored_probabilities_keep_the_gradient_unbiased():
    """The loss gradient w.r.t. the logits is ``softmax - onehot``: its entries sum to 0 in every row.
    Rounded to nearest at 8 bits, a peaked row's many small probabilities read back 0 and the sum goes
    negative (the tail is no longer pushed down: a bias that training accumulates); agoq rounds
    stored probabilities stochastically, so the sum stays 0 up to noise. Bound: a stochastically
    rounded entry errs by at most one step (its group's max / 127), with variance <= step^2 / 4, so the
    batch-mean row sum has standard deviation <= sqrt(sum over groups of 128 step^2 / 4) / rows."""
    from agoq_ds.activation import ActivationQuantizer
    from agoq_ds.quant import dequantize, quantize

    rows, vocab = 2048, 512
    torch.manual_seed(0)
    head = torch.nn.Linear(64, vocab)
    with torch.no_grad():
        head.weight.mul_(4)
    x = torch.randn(rows, 64)
    target = torch.randint(0, vocab, (rows,))
    probs = head(x).softmax(-1).detach()
    steps = probs.view(-1, 128).amax(-1) / 127
    sigma = float((128 * steps.square() / 4).sum().sqrt()) / rows
    nearest = dequantize(quantize(probs.contiguous(), 8, 128, scale_dtype=torch.bfloat16)).view(rows, vocab)
    assert abs(float(nearest.sum(-1).mean()) - 1) > 10 * sigma  # the bias this test must catch

    quantizer = ActivationQuantizer(head_loss := _HeadLoss(head), ActivationConfig(policy="uniform", default_bits=8))
    quantizer.install()
    for _ in range(3):
        head.zero_grad()
        head_loss(x, target).backward()
        quantizer.on_step_end()
        assert quantizer._current().by_class["other"].quantized_numel >= rows * vocab  # stored quantized
        assert abs(float(head.bias.grad.sum())) < 5 * sigma
    quantizer.remove()


class _HeadLoss(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(x), target)
