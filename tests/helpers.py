"""Shared test helpers: verbose closeness checks, float64 references, random-input factories.

Every comparison is made in float64 against references computed in float64 from the *same*
(possibly low-precision) inputs, so the only error measured is the op's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlfuse.kernels import reference

LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# backend cases
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendCase:
    """One backend to run the public ops on, the device its tensors live on, and whether it is
    slow here (Triton's CPU interpreter), in which case tests shrink their sizes."""

    name: str
    device: torch.device
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device.type}"

    def has(self, fn: str) -> bool:
        from rlfuse.kernels import dispatch

        module = dispatch._load(self.name)
        return module is not None and hasattr(module, fn)


def shrink(backend: BackendCase, full: int, small: int) -> int:
    """``small`` on a slow backend (the Triton interpreter), else ``full``."""
    return small if backend.slow else full


# --------------------------------------------------------------------------------------------
# closeness
# --------------------------------------------------------------------------------------------
def _fmt_index(flat_idx: int, shape) -> tuple:
    if not shape:
        return ()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_idx), tuple(shape)))


def assert_close_verbose(actual: Tensor, expected: Tensor, *, atol: float, rtol: float = 0.0,
                         name: str = "tensor", max_print: int = 8, equal_nan: bool = False) -> None:
    """Like torch.testing.assert_close (|a - e| <= atol + rtol * |e|), compared in float64,
    but on failure prints the worst offenders with their indices, values and errors."""
    if not isinstance(actual, Tensor):
        actual = torch.as_tensor(actual)
    if not isinstance(expected, Tensor):
        expected = torch.as_tensor(expected)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    if equal_nan:
        nan_bad = a_nan ^ e_nan
    else:
        nan_bad = a_nan | e_nan
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    err = (a - e).abs()
    err = torch.where(both_inf | (equal_nan & a_nan & e_nan), torch.zeros_like(err), err)
    tol = atol + rtol * e.abs()
    bad = (err > tol) | torch.isnan(err) | nan_bad
    bad &= ~(equal_nan & a_nan & e_nan)
    if not bool(bad.any()):
        return
    excess = torch.where(bad, torch.nan_to_num(err - tol, nan=math.inf), torch.full_like(err, -math.inf))
    order = torch.argsort(excess.flatten(), descending=True)[:max_print]
    lines = [f"{name}: {int(bad.sum())} / {a.numel()} elements outside atol={atol:g} rtol={rtol:g}; "
             f"max abs err {float(torch.nan_to_num(err, nan=math.inf).max()):.3e}; worst offenders:"]
    af, ef, errf = a.flatten(), e.flatten(), err.flatten()
    for i in order.tolist():
        lines.append(f"  at {_fmt_index(i, a.shape)}: got {af[i].item():.8g}, expected {ef[i].item():.8g}, "
                     f"|err| {errf[i].item():.3e}")
    raise AssertionError("\n".join(lines))


def assert_no_worse_than_baseline(actual: Tensor, baseline: Tensor, truth: Tensor, *, factor: float = 2.0,
                                  atol: float = 1e-6, name: str = "tensor") -> None:
    """The Apple cut-cross-entropy criterion for low-precision kernels: the op's error against the
    float64 truth must be no worse than ``factor`` x the error of the same-dtype PyTorch baseline
    computed from the same inputs (max and mean absolute error; ``atol`` forgives rounding noise)."""
    t = truth.detach().to("cpu", torch.float64)
    op_err = (actual.detach().to("cpu", torch.float64) - t).abs()
    base_err = (baseline.detach().to("cpu", torch.float64) - t).abs()
    assert torch.isfinite(op_err).all(), f"{name}: non-finite values in the op's output"
    checks = {"max": (op_err.max(), base_err.max()), "mean": (op_err.mean(), base_err.mean())}
    for what, (o, b) in checks.items():
        o, b = float(o), float(b)
        if o > factor * b + atol:
            worst = torch.argsort(op_err.flatten(), descending=True)[:6].tolist()
            af, bf, tf = actual.detach().double().flatten(), baseline.detach().double().flatten(), t.flatten()
            rows = "\n".join(f"  at {_fmt_index(i, t.shape)}: op {af[i].item():.8g}, baseline {bf[i].item():.8g}, "
                             f"truth {tf[i].item():.8g}" for i in worst)
            raise AssertionError(f"{name}: {what} |err| {o:.3e} vs fp64 truth exceeds {factor} x baseline "
                                 f"{what} |err| {b:.3e} + {atol:g}; worst offenders:\n{rows}")


# --------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------
def ref_logprobs64(logits: Tensor, labels: Tensor, temperature: float = 1.0):
    """(logp, entropy) in float64 from the given logits (upcast exactly)."""
    z = logits.detach().double()
    return reference.logprobs_from_logits(z, labels.long(), temperature=temperature, return_entropy=True)


def ref_logprobs_grad64(logits: Tensor, labels: Tensor, w_logp: Tensor | None, w_ent: Tensor | None,
                        temperature: float = 1.0) -> Tensor:
    """d/d logits of sum(logp * w_logp + entropy * w_ent) in float64."""
    z = logits.detach().double().requires_grad_(True)
    logp, ent = reference.logprobs_from_logits(z, labels.long(), temperature=temperature, return_entropy=True)
    total = z.new_zeros(())
    if w_logp is not None:
        total = total + (logp * w_logp.double()).sum()
    if w_ent is not None:
        total = total + (ent * w_ent.double()).sum()
    (g,) = torch.autograd.grad(total, z)
    return g


def baseline_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0):
    """The same-dtype PyTorch baseline: log_softmax(x.float() / T) from the low-precision logits."""
    z = logits.float() / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def ref_linear64(hidden, weight, labels, bias=None, temperature=1.0, w_logp=None, w_ent=None):
    """float64 forward (logp, entropy) and grads (hidden, weight, bias) of the unfused LM head."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    logp, ent = reference.linear_logprobs(h, w, labels.long(), bias=b, temperature=temperature,
                                          return_entropy=True)
    total = h.new_zeros(())
    if w_logp is not None:
        total = total + (logp * w_logp.double()).sum()
    if w_ent is not None:
        total = total + (ent * w_ent.double()).sum()
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(total, inputs)
    return logp.detach(), ent.detach(), grads


def baseline_linear(hidden, weight, labels, bias=None, temperature=1.0, w_logp=None, w_ent=None):
    """Same-dtype unfused baseline: logits = hidden @ weight.T (+ bias) in the input dtype, then a
    float32 log-softmax. Returns forward (logp, entropy) and the grads (input dtype)."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    logp, ent = baseline_logprobs(logits, labels, temperature)
    total = logp.new_zeros(())
    if w_logp is not None:
        total = total + (logp * w_logp).sum()
    if w_ent is not None:
        total = total + (ent * w_ent).sum()
    inputs = [h, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(total, inputs)
    return logp.detach(), ent.detach(), grads


# --------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_logits(shape, *, dtype=torch.float32, device="cpu", scale: float = 3.0, seed: int = 0) -> Tensor:
    """Logits with a spread (scale) wide enough to make peaked and flat rows."""
    g = gen(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    # a few very confident positions so that p ~ 1 cases are covered
    if x.numel() and shape[-1] > 1:
        flat = x.view(-1, shape[-1])
        rows = torch.randint(0, flat.shape[0], (max(1, flat.shape[0] // 4),), generator=g)
        cols = torch.randint(0, shape[-1], rows.shape, generator=g)
        flat[rows, cols] += 25.0
    return x.to(device=device, dtype=dtype)


def rand_labels(shape, vocab: int, *, device="cpu", seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, tuple(shape), generator=gen(seed)).to(device)


MASK_KINDS = ("full", "left", "right", "holes", "all_masked", "mixed")


def make_mask(batch: int, time: int, kind: str, *, seed: int = 0, device="cpu") -> Tensor:
    """Boolean [batch, time] masks:

    full        every position valid
    left        left padding (each row's valid tokens are a suffix, of random length >= 1)
    right       right padding (valid prefix of random length >= 1)
    holes       random holes (~30% masked), at least one valid token per row
    all_masked  no valid token at all
    mixed       rows cycling through full / left / right / holes / all-masked
    """
    g = gen(seed)
    m = torch.zeros(batch, time, dtype=torch.bool)
    kinds = (["full", "left", "right", "holes", "all_masked"] if kind == "mixed" else [kind])
    for b in range(batch):
        k = kinds[b % len(kinds)]
        n_valid = int(torch.randint(1, time + 1, (1,), generator=g))
        if k == "full":
            m[b] = True
        elif k == "left":
            m[b, time - n_valid:] = True
        elif k == "right":
            m[b, :n_valid] = True
        elif k == "holes":
            m[b] = torch.rand(time, generator=g) > 0.3
            m[b, int(torch.randint(0, time, (1,), generator=g))] = True
        elif k == "all_masked":
            pass
        else:
            raise ValueError(kind)
    return m.to(device)


def randn(*shape, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> Tensor:
    return (torch.randn(tuple(shape), generator=gen(seed), dtype=torch.float64) * scale).to(device=device, dtype=dtype)
