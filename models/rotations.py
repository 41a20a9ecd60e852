"""Orthogonal rotations before quantization (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

An orthogonal Q leaves a full-precision network's function unchanged where both sides of a product are rotated
((xQ)(WQ)^T = xW^T) but spreads a few outlier channels over all of them, so per-token 4-bit scales stop being
set by the outliers. `rotate_model(model, kind, seed)` folds, in float64, into a LLaMA-family model:
  - R1 on the residual stream: each RMSNorm's scale goes into the linear layers that read it (RMSNorm without a
    scale commutes with Q), then the embedding, every reader (q/k/v, gate/up, lm_head: W Q) and every writer
    (o_proj, down_proj: Q^T W) of the residual; a tied lm_head is untied first;
  - R2 per attention head on the values: v_proj's rows and o_proj's columns of each head;
  - R4's inverse into down_proj's weight, whose input `OnlineRotation` rotates at run time.
R3, a per-head rotation of keys (and queries) after rotary embedding, cannot be folded: `models.quantize` applies
it where keys are quantized after RoPE. The rotations are pure functions of (kind, size, seed): nothing is stored
in the state dict, and a reloaded checkpoint rebuilds the same ones from its config.

`hadamard` is a randomised Walsh-Hadamard matrix D H / sqrt(n) (random signs D) with H = H_m (x) H_(2^k) for
n = m 2^k, m the smallest order with a Hadamard matrix known here (Paley's constructions, or Williamson's for 172,
which QuaRot uses for LLaMA-7B's 11008 = 172 * 2^6), applied as two small matrix products; where no such m is known
it falls back to `random` (the QR factor of a seeded Gaussian matrix) and warns. docs/ROTATIONS.md lists the
factors of common model widths. Folding applies the same factors to the weights, on their device.

Written here rather than taken from llm-compressor's SpinQuant: that library is an optional extra tied to older
transformers, its online rotations are hooks that cannot sit between this repository's input quantizer and the
layer, and this file is loaded as checkpoint remote code, which may import only torch, transformers, the
standard library and the other remote-code files (see models/quantize.py).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from functools import lru_cache

import torch
from torch import nn

from .quantizers import upcast

ROTATIONS = ("none", "hadamard", "random")
ROTATED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # plain RMSNorm, pre-norm blocks, no embedding scale
RESIDUAL, VALUE, KEY, DOWN_PROJ_INPUT = range(4)  # one random stream per rotation: R1, R2, R3, R4
STREAMS_PER_SEED = 16
# Set on a model whose parameters are placeholders that another process's weights will replace (FSDP2's
# cpu_ram_efficient_loading): folding would only make that memory resident, so only the structure changes.
WEIGHTS_UNREAD = "llm_qat_weights_unread"


def _is_prime(p: int) -> bool:
    return p > 1 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _legendre_matrix(p: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = chi(j - i) over GF(p), chi the quadratic character."""
    squares = {(x * x) % p for x in range(1, p)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, p)], dtype=torch.float64)
    index = torch.arange(p)
    return chi[(index[None, :] - index[:, None]) % p]


def paley_hadamard(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions (I: m = p + 1, p prime = 3 mod 4; II: m = 2(p + 1),
    p prime = 1 mod 4), or of order 1 or 2; None when neither gives one."""
    if m in (1, 2):
        return torch.tensor([[1.0]] if m == 1 else [[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    p = m - 1
    if _is_prime(p) and p % 4 == 3:  # I + S, S the skew conference matrix [[0, 1^T], [-1, Q]]
        conference = torch.zeros(m, m, dtype=torch.float64)
        conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1, -1, _legendre_matrix(p)
        return torch.eye(m, dtype=torch.float64) + conference
    p = m // 2 - 1
    if m % 2 == 0 and _is_prime(p) and p % 4 == 1:  # C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
        conference = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        conference[0, 1:], conference[1:, 0], conference[1:, 1:] = 1, 1, _legendre_matrix(p)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(conference, plus) + torch.kron(torch.eye(m // 2, dtype=torch.float64), minus)
    return None


# Williamson matrices of order 43: symmetric circulant +-1 matrices A, B, C, D with A^2 + B^2 + C^2 + D^2 = 172 I
# (Williamson 1944 gave the first; Holzmann, Kharaghani & Tayfeh-Rezaie 2008 list all up to order 59). Each is
# written as the 21 bits of a_1..a_21 of its first row, bit i - 1 set where a_i = -1 (a_0 = 1, a_(43-i) = a_i);
# row sums 11, -1, -5, -5. Found by a meet-in-the-middle search (pairs of first rows whose periodic autocorrelations
# cancel, see docs/ROTATIONS.md) and checked in integers; tests/test_rotations.py checks H_172 H_172^T = 172 I.
WILLIAMSON_43 = (0x00AD86, 0x1CE6D0, 0x15E875, 0x165CDC)


def _symmetric_circulant(half_bits: int, order: int) -> torch.Tensor:
    half = torch.tensor([-1.0 if half_bits >> i & 1 else 1.0 for i in range(order // 2)], dtype=torch.float64)
    first_row = torch.cat([torch.ones(1, dtype=torch.float64), half, half.flip(0)])
    index = torch.arange(order)
    return first_row[(index[None, :] - index[:, None]) % order]


def williamson_hadamard(quadruple: tuple[int, int, int, int], order: int) -> torch.Tensor:
    """The Williamson array [[A, B, C, D], [-B, A, -D, C], [-C, D, A, -B], [-D, -C, B, A]]: a Hadamard matrix of
    order 4n when A..D are Williamson matrices of order n (symmetric circulants commute, so the blocks cancel)."""
    a, b, c, d = (_symmetric_circulant(bits, order) for bits in quadruple)
    return torch.cat([torch.cat(row, 1) for row in ((a, b, c, d), (-b, a, -d, c), (-c, d, a, -b), (-d, -c, b, a))])


@lru_cache(maxsize=None)
def hadamard_matrix(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m known here (Paley's, or Williamson's for 172), or None."""
    return williamson_hadamard(WILLIAMSON_43, 43) if m == 4 * 43 else paley_hadamard(m)


def sylvester_hadamard(n: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def hadamard_factor(n: int) -> int | None:
    """The smallest m with a Hadamard matrix known here and n = m 2^k, or None."""
    power = n & -n  # the largest power of two dividing n
    for shift in range(power.bit_length()):  # m = n / 2^k, smallest first
        if hadamard_matrix(n // (power >> shift)) is not None:
            return n // (power >> shift)
    return None


class Rotation:
    """One orthogonal n x n matrix, kept as its factors; `apply(x)` is x @ Q on the last dimension."""

    def __init__(self, kind: str, n: int, seed: int, stream: int):
        generator = torch.Generator().manual_seed(seed * STREAMS_PER_SEED + stream)  # the same on any machine
        m = hadamard_factor(n) if kind == "hadamard" else None
        if kind == "hadamard" and m is None:
            warnings.warn(f"no Hadamard matrix of order {n} is known here (n = m 2^k with m = 1, 2, a Paley order or "
                          "172); using a random orthogonal matrix for this rotation", stacklevel=2)
        self.n, self.m = n, m
        if m is not None:
            self.signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
            self.outer, self.inner = hadamard_matrix(m), sylvester_hadamard(n // m)
        else:
            gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
            q, r = torch.linalg.qr(gaussian)
            self.dense = q * torch.sign(torch.diagonal(r))  # the unique Q with a positive diagonal of R
        self._copies = {}

    def _factors(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._copies:  # once per device and dtype, not once per call
            factors = (self.dense,) if self.m is None else (self.signs, self.outer, self.inner)
            self._copies[key] = tuple(factor.to(like) for factor in factors)
        return self._copies[key]

    def apply(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x @ Q (x @ Q^T with `inverse`) on the last dimension, computed in x's dtype (autocast or not) on x's
        device."""
        with _without_autocast(x.device.type):
            if self.m is None:
                (dense,) = self._factors(x)
                return x @ (dense.T if inverse else dense)
            signs, outer, inner = self._factors(x)
            if not inverse:  # Q = D (H_m (x) H_2^k) / sqrt(n): x -> x D, then X -> H_m^T X H_2^k on its m x 2^k view
                blocks = (x * signs).unflatten(-1, (self.m, self.n // self.m))
                return (outer.T @ blocks @ inner).flatten(-2) / math.sqrt(self.n)
            blocks = x.unflatten(-1, (self.m, self.n // self.m))
            return (outer @ blocks @ inner.T).flatten(-2) * signs / math.sqrt(self.n)

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=torch.float64))


def _without_autocast(device_type: str):
    """Autocast would run the products in bfloat16 and round every rotated value; off where the device has it."""
    return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
        else contextlib.nullcontext()


@lru_cache(maxsize=None)
def rotation(kind: str, n: int, seed: int, stream: int) -> Rotation:
    """The rotation, built once per process on the CPU: the cache outlives the caller's default device (a model
    structure checked under `torch.device("meta")` would otherwise leave factors with no data for every later use)."""
    with torch.device("cpu"):
        return Rotation(kind, n, seed, stream)


def rotate(x: torch.Tensor, kind: str, seed: int, stream: int, inverse: bool = False) -> torch.Tensor:
    """x @ Q (or Q^T) on the last dimension, computed in float32 (float64 stays float64), returned in x's dtype."""
    return rotation(kind, x.shape[-1], seed, stream).apply(upcast(x), inverse).to(x.dtype)


class OnlineRotation(nn.Module):
    """x -> x @ Q at run time (no parameters or buffers: Q is rebuilt from its kind, size and seed)."""

    def __init__(self, kind: str, n: int, seed: int, stream: int):
        super().__init__()
        self.kind, self.n, self.seed, self.stream = kind, n, seed, stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rotate(x, self.kind, self.seed, self.stream)

    def extra_repr(self):
        return f"{self.kind}, n={self.n}, seed={self.seed}"


def head_dim(config) -> int:
    """The width of one attention head: the config's `head_dim` where it sets one, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_rotatable(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATED_MODEL_TYPES:
        raise ValueError(f"rotations are folded for the model types {', '.join(ROTATED_MODEL_TYPES)}, not "
                         f"{model_type!r}; use rotate='none' for this model")


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    """A weight in float64 on its own device, where folding computes (CPU and CUDA both have float64)."""
    return tensor.detach().to(torch.float64)


def _update(parameter: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(value.to(parameter.dtype))


def _untie_output_layer(model: nn.Module) -> None:
    """R1 reaches the embedding and lm_head differently once the final norm is folded into lm_head."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output.weight is embedding.weight:
        output.weight = nn.Parameter(embedding.weight.detach().clone(), requires_grad=embedding.weight.requires_grad)
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


def rotate_model(model: nn.Module, kind: str, seed: int = 0) -> nn.Module:
    """Fold R1, R2 and R4's inverse into the weights of `model` (a full-precision LLaMA-family causal LM, or its
    student), in place. The rotated model needs `OnlineRotation(kind, intermediate_size, seed, DOWN_PROJ_INPUT)`
    on down_proj's input to compute what it computed before (`models.quantize` puts it there).
    Each product W Q goes through the rotation's factors (`Rotation.apply`, Q^T W as (W^T Q)^T) in float64 on the
    weight's device: a dense n x n Q would cost n^2 per weight row (about a TFLOP per LLaMA-7B layer)."""
    check_rotatable(model)
    _untie_output_layer(model)
    if getattr(model, WEIGHTS_UNREAD, False):
        return model
    decoder = model.get_decoder()
    residual = rotation(kind, model.config.hidden_size, seed, RESIDUAL)
    value = rotation(kind, head_dim(model.config), seed, VALUE)
    down_input = rotation(kind, model.config.intermediate_size, seed, DOWN_PROJ_INPUT)

    def read(linears, norm):  # x -> norm(x) W^T becomes (x R1) -> unit_norm(x R1) (W diag(norm) R1)^T
        scale = _float64(norm.weight) if norm is not None else 1
        for linear in linears:
            _update(linear.weight, residual.apply(_float64(linear.weight) * scale))
        if norm is not None:
            _update(norm.weight, torch.ones_like(norm.weight))

    def write(linear):  # y = x W^T + b becomes y R1 = x (R1^T W)^T + b R1
        _update(linear.weight, residual.apply(_float64(linear.weight).T).T)
        if linear.bias is not None:
            _update(linear.bias, residual.apply(_float64(linear.bias)))

    embedding = model.get_input_embeddings()
    _update(embedding.weight, residual.apply(_float64(embedding.weight)))
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        read([attention.q_proj, attention.k_proj, attention.v_proj], layer.input_layernorm)
        read([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm)
        write(attention.o_proj)
        write(mlp.down_proj)
        # R2: each value head v_h -> v_h R2 (v_proj's rows), and o_proj reads each head's output through R2
        v_rows = _float64(attention.v_proj.weight).unflatten(0, (-1, value.n))  # [heads, head_dim, hidden]
        _update(attention.v_proj.weight, value.apply(v_rows.mT).mT.flatten(0, 1))
        if attention.v_proj.bias is not None:
            v_bias = _float64(attention.v_proj.bias).unflatten(0, (-1, value.n))
            _update(attention.v_proj.bias, value.apply(v_bias).flatten())
        o_columns = _float64(attention.o_proj.weight).unflatten(1, (-1, value.n))
        _update(attention.o_proj.weight, value.apply(o_columns).flatten(1))
        _update(mlp.down_proj.weight, down_input.apply(_float64(mlp.down_proj.weight)))  # its input turns into h R4
    read([model.get_output_embeddings()], decoder.norm)
    return model
