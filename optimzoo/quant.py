"""Fake (simulated) quantization of linear layers: the INT4 / INT8 / FP4 setting of Stable-SPAM.

Stable-SPAM (Huang, Zhu, Jin, Wang, Liu, "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
Adam", arXiv 2502.17055) trains LLaMA with weights and input activations of the linear layers
quantized in the forward pass and full-precision master weights. This module reproduces what the
official code (TianjinYellow/StableSPAM at commit 6a66da1ea700) computes; written from reading it,
not copied.

What the official code does (file, function) and what this module does
------------------------------------------------------------------------
* **Which layers** (``utils/setup.py``, ``setup_model``; ``prepare_model_for_*`` in
  ``utils/act_weight_quantization.py`` / ``utils/act_weight_fp4.py``): every ``nn.Linear`` whose child
  name is one of ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` (:data:`LLAMA_PROJECTIONS`).
  Embeddings and ``lm_head`` stay in full precision. :func:`fake_quantize` matches the same way (the
  last component of the module's name), with the targets configurable.
* **INT runs** (``--act_quant``, ``INT4_scripts/350-stablespam-int4.sh``): ``setup_model`` calls
  ``prepare_model_for_int8_training_simulation_act_weight`` (``utils/act_weight_quantization.py``;
  the ``--weight_quant`` branch is commented out), whose ``QLinear`` quantizes

  - the weight with ``_quantize_tensor``: the weight is flattened row-major and cut into groups of
    ``weight_group_size`` consecutive elements (so a group runs along the input dimension, and spans
    several rows when ``in_features`` is not a multiple of it); per group asymmetric min/max:
    ``scale = max(max - min, 1e-5) / (2^b - 1)``, ``zero = clamp(-round(min / scale), 0, 2^b - 1)``,
    ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``, dequantized ``(q - zero) * scale``;
    round-to-nearest (even), no stochastic rounding. Gradient straight-through
    (``qweight.detach() + w - w.detach()``). -> :func:`quantize_weight`.
  - the input with ``A8Linear`` -> ``fake_tensor_quantize`` / ``fake_topk_quantize``
    (``utils/dummy_quant.py``): the input is flattened (last dim contiguous) into groups of
    ``group_size`` consecutive elements; per group the ``topk = 2`` largest magnitudes are kept exactly
    (outliers), the rest is symmetric absmax: ``scale = max(absmax, 1e-6)``,
    ``q = clamp(round(x * (2^(b-1) - 1) / scale [+ U - 1/2]), -2^(b-1), 2^(b-1) - 1)``, dequantized
    ``q * scale / (2^(b-1) - 1)``, with ``U ~ Uniform[0, 1)`` only when stochastic. The backward uses
    the dequantized input for the weight gradient and ``grad_output @ qweight`` for the input
    gradient, i.e. straight-through for both. -> :func:`quantize_activation`.

  **The launch script's activation flags are never read.** ``QLinear.__init__`` sets
  ``A8Linear.quant_bit = weight_bits``, ``quant_group_size = weight_group_size``,
  ``stochastic_round = args.stochastic_round`` and ``quant_topk = 2``; ``--act_bits``,
  ``--act_group_size 64``, ``--act_topk`` and ``--act_stochastic`` are parsed (``utils/argparse.py``)
  and used nowhere, and ``--stochastic_round`` is not passed. So the published INT4 run quantized
  activations to 4 bits in groups of **256** with **deterministic** rounding and 2 outliers per group.
  The presets follow what the code computed: ``"int4"`` = ``"w4g256,a4g256o2"``; the setting the
  flags describe is the custom spec ``"w4g256,a4g64o2s"``.
* **FP4 runs** (``--fp4``, ``FP4_scripts/350-stablespam-fp4.sh``): ``Qfp4Linear`` in
  ``utils/act_weight_fp4.py`` sends weights (straight-through) and inputs (``A8Linear``, backward as
  above) through ``fp4_fake_quantize(x, e=1, m=2, b=1, topk=2)``: flattened groups of 256 (hard-coded),
  2 outliers kept exactly, ``alpha = max(absmax of the rest, 1e-6)``,
  ``bias = 2^e - log2(alpha) + log2(2 - 2^-m) - 1``,
  ``E = max(floor(log2(|x| + 1e-8) + bias) - m, 1 - m)``, ``x_q = alpha 2^-b 2^E round(x / (alpha 2^-b 2^E))``.
  With e=1, m=2, b=1 the exponent ``E`` is always ``1 - m = -1`` (``floor(...) <= 1`` for
  ``|x| <= alpha``), so the step is ``alpha / 4`` everywhere: the value set is
  ``{0, +-1/4, +-1/2, +-3/4, +-1} * alpha`` (9 uniform levels), not the 15-value E1M2 grid
  ``{0, 0.25, ..., 1.75}`` a float format with these bit counts would have. -> :func:`quantize_fp4`
  (``exponent_bits``, ``mantissa_bits``, ``scale_shift`` are e, m, b).
* **Master weights**: the official code keeps the parameters in the model dtype (bf16 in the runs) and
  quantizes in it; here the parameters stay whatever the model holds (fp32 master weights, also under
  bf16 autocast) and each quantizer computes in its input's dtype; under autocast ``F.linear`` then
  casts the fake-quantized tensors to bf16.

Differences from the official code, on purpose
----------------------------------------------
* ``quantize_weight`` does not clamp the zero point to ``[0, 2^b - 1]``. Where a group contains 0
  (``min <= 0 <= max``, every group of a randomly initialized or trained weight in practice) the clamp is
  inactive and the results are identical; in a group of one sign the clamped zero point cannot reach the
  group and the reference's error grows to the group's offset from 0 (a silent wrong answer), while here
  the error stays within half a step.
* A tensor whose size is not a multiple of the group size: the reference fails (``assert`` / ``view``);
  here the last, shorter group holds the remainder.
* ``fp4_fake_quantize`` with ``topk=0`` returns its input unquantized (its rounding line sits inside
  ``if topk > 0``); :func:`quantize_fp4` quantizes for every ``outliers``.

Why not torchao
---------------
``torchao.quantization.qat`` (``IntxFakeQuantizeConfig`` / ``FakeQuantizedLinear``; from its source and
ENVIRONMENT.md's notes on torchao 0.18, not installed here) groups each row's last dimension on its own
(no groups across rows as the reference's flattened layout has), chooses its own asymmetric zero point,
and has neither the top-k outliers kept in full precision nor a stochastic-rounding option; its MX and
NVFP4 formats are E2M1 elements with power-of-two (E8M0) or FP8 block scales over 32 / 16 elements, not
the reference's 9-level absmax grid over 256 with outliers. None reproduces the reference's numerics,
and the core package depends on torch alone, so the quantizers are written here.

Spec strings (:meth:`QuantSpec.parse`)
--------------------------------------
A preset name (:data:`PRESETS`: ``int4``, ``int8``, ``fp4``) or comma-separated parts:
``w<bits|fp4>g<group>`` for weights, ``a<bits|fp4>g<group>[o<outliers>][s]`` for input activations
(``o``: largest magnitudes per group kept exactly, ``s``: stochastic rounding), and optionally
``t=<name>+<name>...`` for the target layer names. Examples: ``"w4g256"`` (weights only),
``"w4g256,a4g64o2s"``, ``"wfp4g256o2,afp4g256o2"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LLAMA_PROJECTIONS",
    "PRESETS",
    "FakeQuantLinear",
    "QuantSpec",
    "TensorQuant",
    "fake_quantize",
    "quantize_activation",
    "quantize_fp4",
    "quantize_weight",
    "straight_through",
]

#: the linear layers the official code quantizes (``utils/setup.py``, ``setup_model``)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Quantizers: pure functions, same shape and dtype out as in
# --------------------------------------------------------------------------------------------


def _check_tensor(x: Tensor, what: str) -> None:
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(x, DTensor):
            raise TypeError(
                f"{what}: got a DTensor; groups of a local shard are not the groups of the tensor. "
                "Quantize the full tensor (FSDP2 passes unsharded weights to forward; else .full_tensor())")
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")


def _by_groups(x: Tensor, group_size: int, rows: Callable[[Tensor], Tensor]) -> Tensor:
    """``rows`` applied to groups of ``group_size`` consecutive elements of ``x`` flattened row-major
    (``rows`` maps a ``(n, group)`` matrix to one of the same shape); a last, shorter group holds the
    remainder."""
    if group_size < 1:
        raise ValueError(f"Invalid group_size: {group_size} (must be >= 1)")
    flat = x.reshape(-1)
    whole = flat.numel() - flat.numel() % group_size
    parts = []
    if whole:
        parts.append(rows(flat[:whole].view(-1, group_size)).reshape(-1))
    if whole < flat.numel():
        parts.append(rows(flat[whole:].view(1, -1)).reshape(-1))
    if not parts:
        return x.clone()
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(x.shape)


def _split_outliers(x: Tensor, outliers: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``x`` (rows) with each row's ``outliers`` largest magnitudes set to 0, their indices and values
    (``fake_topk_quantize``, ``fp4_fake_quantize``); ``x`` itself is not modified."""
    k = min(outliers, x.shape[1])
    if k == 0:
        return x, None, None
    index = x.abs().topk(k, dim=1).indices
    return x.scatter(1, index, 0.0), index, x.gather(1, index)


def _restore_outliers(q: Tensor, index: Tensor | None, values: Tensor | None) -> Tensor:
    return q if index is None else q.scatter(1, index, values)


def _check_bits(bits: int, low: int) -> None:
    if not isinstance(bits, int) or not low <= bits <= 8:
        raise ValueError(f"Invalid bits: {bits!r} (an integer in [{low}, 8])")


def quantize_weight(w: Tensor, bits: int = 4, group_size: int = 256) -> Tensor:
    """Asymmetric min/max fake quantization to ``2**bits`` integer levels per group.

    Official: ``_quantize_tensor`` and ``QLinear.forward`` in ``utils/act_weight_quantization.py``
    (module docstring: the zero point is not clamped, and a remainder forms a last, shorter group).

    Args:
        w: the tensor (a weight ``(out_features, in_features)``); flattened row-major into groups.
        bits: bits per value, 2..8 (default 4): levels ``0 .. 2**bits - 1``.
        group_size: consecutive elements sharing one scale and zero point (default 256, the paper's).

    Returns ``(q - zero) * scale`` with ``scale = max(max - min, 1e-5) / (2**bits - 1)``,
    ``zero = -round(min / scale)``, ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` per group:
    at most ``2**bits`` distinct values per group, each within ``scale / 2`` of its input.
    """
    _check_tensor(w, "quantize_weight")
    _check_bits(bits, 2)
    top = 2**bits - 1

    def rows(g: Tensor) -> Tensor:
        low = g.amin(dim=1, keepdim=True)
        scale = (g.amax(dim=1, keepdim=True) - low).clamp(min=1e-5) / top
        zero = -torch.round(low / scale)
        return ((torch.round(g / scale) + zero).clamp(0, top) - zero) * scale

    return _by_groups(w, group_size, rows)


def quantize_activation(x: Tensor, bits: int = 4, group_size: int = 256, stochastic: bool = False,
                        generator: torch.Generator | None = None, outliers: int = 2) -> Tensor:
    """Symmetric absmax fake quantization to signed integer levels per group, the largest magnitudes
    kept exactly.

    Official: ``fake_topk_quantize`` / ``fake_topk_dequantize`` in ``utils/dummy_quant.py``, called by
    ``A8Linear`` in ``utils/act_weight_quantization.py`` with ``topk = 2``.

    Args:
        x: the tensor (a linear layer's input); flattened row-major (last dim contiguous) into groups.
        bits: bits per value, 2..8 (default 4): levels ``-2**(bits-1) .. 2**(bits-1) - 1``.
        group_size: consecutive elements sharing one scale (default 256, what the official INT4 run used).
        stochastic: round up with probability equal to the fractional part (``round(y + U - 1/2)``,
            ``U ~ Uniform[0, 1)``), unbiased; else round to nearest (even). Default False (the official run).
        generator: the random generator for ``stochastic`` (default: torch's global one).
        outliers: per group, this many largest magnitudes pass unquantized (default 2, the official ``topk``).

    Returns ``q * scale / (2**(bits-1) - 1)`` with ``scale = max(absmax of the non-outliers, 1e-6)`` and
    ``q = clamp(round(x * (2**(bits-1) - 1) / scale), -2**(bits-1), 2**(bits-1) - 1)``.
    """
    _check_tensor(x, "quantize_activation")
    _check_bits(bits, 2)
    if outliers < 0:
        raise ValueError(f"Invalid outliers: {outliers} (must be >= 0)")
    top = 2 ** (bits - 1) - 1

    def rows(g: Tensor) -> Tensor:
        g, index, values = _split_outliers(g, outliers)
        scale = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)
        y = g * (top / scale)
        if stochastic:
            y = y + (torch.rand(y.shape, generator=generator, dtype=y.dtype, device=y.device) - 0.5)
        return _restore_outliers(y.round().clamp(-top - 1, top) * scale / top, index, values)

    return _by_groups(x, group_size, rows)


def quantize_fp4(x: Tensor, group_size: int = 256, outliers: int = 2, *, exponent_bits: int = 1,
                 mantissa_bits: int = 2, scale_shift: int = 1) -> Tensor:
    """The official "FP4" fake quantizer: absmax-scaled, power-of-two steps chosen per element.

    Official: ``fp4_fake_quantize(x, e=1, m=2, b=1, topk=2)`` in ``utils/act_weight_fp4.py`` (groups of
    256 hard-coded there). With the defaults the output is ``k * alpha / 4``, ``k in -4..4``, per group
    (``alpha`` = absmax of the non-outliers): see the module docstring.

    Args:
        x: the tensor (weight or input); flattened row-major into groups.
        group_size: consecutive elements sharing one scale (default 256).
        outliers: per group, this many largest magnitudes pass unquantized (default 2, the official ``topk``).
        exponent_bits: ``e`` (default 1).
        mantissa_bits: ``m`` (default 2).
        scale_shift: ``b``: the step is ``alpha * 2**-b * 2**E`` (default 1).
    """
    _check_tensor(x, "quantize_fp4")
    if outliers < 0:
        raise ValueError(f"Invalid outliers: {outliers} (must be >= 0)")
    e, m, b = exponent_bits, mantissa_bits, scale_shift
    log2_top = math.log2(2 - 2**-m)  # log2 of the largest mantissa, 1.11..1b

    def rows(g: Tensor) -> Tensor:
        g, index, values = _split_outliers(g, outliers)
        alpha = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-6)  # |g| <= alpha: no clamp of g needed
        bias = 2**e - torch.log2(alpha) + log2_top - 1
        exponent = (torch.floor(torch.log2(g.abs() + 1e-8) + bias) - m).clamp(min=1 - m)
        step = alpha * 2.0**-b * torch.pow(2, exponent)
        return _restore_outliers(step * torch.round(g / step), index, values)

    return _by_groups(x, group_size, rows)


class _StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``, backward the identity (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def straight_through(x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
    """``quantize(x)`` in the forward pass, gradient passed through unchanged to ``x``: the output is
    exactly ``quantize(x)`` (the official ``q.detach() + x - x.detach()`` rounds twice)."""
    return _StraightThrough.apply(x, quantize)


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

_PART = re.compile(r"(?P<role>[wa])(?P<fmt>fp4|\d+)g(?P<group>\d+)(?:o(?P<outliers>\d+))?(?P<stochastic>s)?")
_HELP = ("expected a preset (" + "{presets}" + ") or comma-separated parts like 'w4g256,a4g64o2s': "
         "w=weights, a=input activations, then <bits> or fp4, g<group size>, o<outliers kept exact> "
         "(activations, fp4), s=stochastic rounding (int activations), and optionally t=<name>+<name>")


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor (weights or input activations) is fake-quantized.

    Args:
        format: ``"int"`` (weights: :func:`quantize_weight`, activations: :func:`quantize_activation`)
            or ``"fp4"`` (:func:`quantize_fp4`).
        bits: bits per value, 2..8 for ``"int"``; 4 for ``"fp4"``.
        group_size: consecutive elements sharing a scale.
        outliers: largest magnitudes per group kept exactly (int activations and fp4; 0 for int weights).
        stochastic: stochastic rounding (int activations only).
    """

    format: str
    bits: int
    group_size: int
    outliers: int = 0
    stochastic: bool = False

    def __post_init__(self):
        if self.format not in ("int", "fp4"):
            raise ValueError(f"Invalid format: {self.format!r} (int or fp4)")
        if self.format == "fp4" and self.bits != 4:
            raise ValueError(f"Invalid bits for fp4: {self.bits} (must be 4)")
        _check_bits(self.bits, 2)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"Invalid group_size: {self.group_size!r} (an integer >= 1)")
        if not isinstance(self.outliers, int) or self.outliers < 0:
            raise ValueError(f"Invalid outliers: {self.outliers!r} (an integer >= 0)")
        if self.stochastic and self.format == "fp4":
            raise ValueError("stochastic rounding is not defined for fp4 (the official quantizer rounds to nearest)")

    def describe(self, role: str) -> str:
        return (f"{role}{'fp4' if self.format == 'fp4' else self.bits}g{self.group_size}"
                + (f"o{self.outliers}" if self.outliers else "") + ("s" if self.stochastic else ""))


@dataclass(frozen=True)
class QuantSpec:
    """Which ``nn.Linear`` layers are fake-quantized, and how their weights and inputs are.

    Args:
        weight: the weights' quantizer, or None to keep weights in full precision.
        activation: the inputs' quantizer, or None to keep inputs in full precision.
        targets: child names of the ``nn.Linear`` modules to quantize (default :data:`LLAMA_PROJECTIONS`).
    """

    weight: TensorQuant | None
    activation: TensorQuant | None
    targets: tuple[str, ...] = LLAMA_PROJECTIONS

    def __post_init__(self):
        if self.weight is None and self.activation is None:
            raise ValueError("QuantSpec quantizes nothing: give a weight or an activation quantizer")
        if self.weight is not None and self.weight.format == "int" and (self.weight.outliers or self.weight.stochastic):
            raise ValueError("int weights take neither outliers nor stochastic rounding (official "
                             "_quantize_tensor): drop 'o'/'s' from the weight part")
        if not isinstance(self.targets, tuple) or not self.targets or not all(
                isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"Invalid targets: {self.targets!r} (a non-empty tuple of module names)")

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """A preset name (:data:`PRESETS`) or a spec string (module docstring); ValueError otherwise."""
        if text in PRESETS:
            return PRESETS[text]
        fail = f"Invalid quantization spec {text!r}: " if isinstance(text, str) else "Invalid quantization spec: "
        how = _HELP.format(presets=", ".join(PRESETS))
        if not isinstance(text, str) or not text.strip():
            raise ValueError(fail + how)
        fields: dict = {"weight": None, "activation": None}
        for part in text.split(","):
            part = part.strip()
            if part.startswith("t="):
                if "targets" in fields:
                    raise ValueError(fail + "targets given twice")
                fields["targets"] = tuple(part[2:].split("+"))
                continue
            found = _PART.fullmatch(part)
            if found is None:
                raise ValueError(fail + f"cannot read part {part!r}; " + how)
            role = "weight" if found["role"] == "w" else "activation"
            if fields[role] is not None:
                raise ValueError(fail + f"the {role} part is given twice")
            fmt = found["fmt"]
            try:
                fields[role] = TensorQuant("fp4" if fmt == "fp4" else "int", 4 if fmt == "fp4" else int(fmt),
                                           int(found["group"]), int(found["outliers"] or 0), bool(found["stochastic"]))
            except ValueError as err:
                raise ValueError(fail + f"part {part!r}: {err}") from None
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(fail + str(err)) from None

    def describe(self) -> str:
        """The preset's name if this is a preset, else the canonical spec string (``parse`` reads it back)."""
        for name, spec in PRESETS.items():
            if spec == self:
                return name
        parts = [q.describe(r) for r, q in (("w", self.weight), ("a", self.activation)) if q is not None]
        if self.targets != LLAMA_PROJECTIONS:
            parts.append("t=" + "+".join(self.targets))
        return ",".join(parts)

    def quantize_weight(self, w: Tensor) -> Tensor:
        """``w`` through the weight quantizer (unchanged if there is none)."""
        q = self.weight
        if q is None:
            return w
        if q.format == "fp4":
            return quantize_fp4(w, q.group_size, q.outliers)
        return quantize_weight(w, q.bits, q.group_size)

    def quantize_input(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x`` through the activation quantizer (unchanged if there is none)."""
        q = self.activation
        if q is None:
            return x
        if q.format == "fp4":
            return quantize_fp4(x, q.group_size, q.outliers)
        return quantize_activation(x, q.bits, q.group_size, q.stochastic, generator, q.outliers)


#: the paper's settings, as the official code computes them (module docstring): ``int4`` is
#: ``INT4_scripts/350-stablespam-int4.sh``, ``int8`` the same run with ``--weight_bits 8`` (which sets
#: the activations' bits too), ``fp4`` is ``FP4_scripts/350-stablespam-fp4.sh``
PRESETS: dict[str, QuantSpec] = {
    "int4": QuantSpec(TensorQuant("int", 4, 256), TensorQuant("int", 4, 256, outliers=2)),
    "int8": QuantSpec(TensorQuant("int", 8, 256), TensorQuant("int", 8, 256, outliers=2)),
    "fp4": QuantSpec(TensorQuant("fp4", 4, 256, outliers=2), TensorQuant("fp4", 4, 256, outliers=2)),
}


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` computing ``F.linear(spec.quantize_input(x), spec.quantize_weight(W), b)`` with
    straight-through gradients to ``x`` and ``W``: ``dL/dx = g Q(W)``, ``dL/dW = g^T Q(x)``, as the
    official ``A8Linear.backward``. Same parameters and state_dict keys as ``nn.Linear``.

    Args: those of ``nn.Linear``, and ``spec`` (a :class:`QuantSpec`; its ``targets`` are not used here).
    Stochastic input rounding draws from torch's global generator.
    """

    spec: QuantSpec

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 spec: QuantSpec):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.spec = spec

    def forward(self, input: Tensor) -> Tensor:
        weight = self.weight if self.spec.weight is None else straight_through(self.weight, self.spec.quantize_weight)
        if self.spec.activation is not None:
            input = straight_through(input, self.spec.quantize_input)
        return F.linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quant={self.spec.describe()}"


def fake_quantize(model: nn.Module, spec: str | QuantSpec) -> list[str]:
    """Turn the ``nn.Linear`` modules of ``model`` whose child name is in ``spec.targets`` into
    :class:`FakeQuantLinear`, in place; return their qualified names.

    The modules keep their identity and their parameters (the class is swapped, as ``fully_shard``
    does): optimizers, hooks and state_dict keys are unaffected, master weights stay in their dtype.
    Works before or after ``fully_shard`` of the blocks (FSDP2 hands each module its unsharded weight
    in forward), not on a linear layer that ``fully_shard`` wrapped itself.

    Args:
        model: the model, modified in place.
        spec: a preset name (``"int4"``, ``"int8"``, ``"fp4"``), a spec string or a :class:`QuantSpec`.

    Raises ValueError if no module matches, TypeError if a matching module is not a plain ``nn.Linear``
    (already quantized, or wrapped by ``fully_shard``).
    """
    spec = spec if isinstance(spec, QuantSpec) else QuantSpec.parse(spec)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in spec.targets]
    for name, module in chosen:
        if type(module) is not nn.Linear:
            raise TypeError(f"fake_quantize: {name} is a {type(module).__name__}, not a plain nn.Linear "
                            "(already fake-quantized, or fully_shard applied to it: quantize before sharding)")
    if not chosen:
        raise ValueError(f"fake_quantize: no nn.Linear named {', '.join(spec.targets)} in "
                         f"{type(model).__name__}; set QuantSpec(targets=...) (or t=... in the spec string)")
    for _, module in chosen:
        module.__class__ = FakeQuantLinear
        module.spec = spec
    return [name for name, _ in chosen]
