"""QuantLinear: an ``nn.Linear`` whose weight is a frozen low-bit QuantizedTensor."""

from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from ..formats import DTYPE_NAME, NESTED_BLOCK, QuantizedTensor, QuantSpec, is_dtensor, json_loads, parse_metadata
from ..functional import linear
from .. import ops
from ..ops import quantize

_COMPONENTS = ("codes", "scale", "zero", "scale_q", "scale_nested", "scale_offset")


class QuantLinear(nn.Module):
    """``y = x · dequant(W)ᵀ + b`` with W (out_features, in_features) stored in a low-bit format.

    The weight's components are buffers (``codes``, ``scale`` or ``scale_q``/``scale_nested``/
    ``scale_offset``, ``zero``): they move with ``.to(device)``, are saved by ``state_dict()`` with
    the format description as extra state, and are never cast by ``.to(dtype)`` / ``.half()``
    (the bias is; the layer computes in its input's dtype). ``weight`` returns the QuantizedTensor.
    :func:`lowbit.distributed.prepare_model` turns the components into frozen parameters
    (``requires_grad=False``, same names, same state-dict keys) so that DDP broadcasts them once and
    FSDP2 shards them; every method here reads a component from whichever of the two it is.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fmt: str = "nf4",
                 block_size: int = 64, double_quant: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        self.spec = QuantSpec(fmt, block_size, double_quant)
        if in_features % block_size:
            raise ValueError(f"in_features={in_features} is not a multiple of block_size={block_size}")
        if dtype not in DTYPE_NAME:
            raise TypeError(f"dtype={dtype} must be float32, bfloat16 or float16")
        self.in_features, self.out_features, self.weight_dtype = in_features, out_features, dtype
        nb = in_features * out_features // block_size
        e = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        self.register_buffer("codes", e(out_features, in_features * self.spec.bits // 8, dt=torch.uint8))
        self.register_buffer("scale", None if double_quant else e(nb))
        self.register_buffer("zero", e(nb) if fmt in ("int4", "int2") else None)
        self.register_buffer("scale_q", e(nb, dt=torch.uint8) if double_quant else None)
        self.register_buffer("scale_nested", e(-(-nb // NESTED_BLOCK)) if double_quant else None)
        self.register_buffer("scale_offset", e(()) if double_quant else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "nf4", block_size: int = 64,
                    double_quant: bool = False) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (its weight dtype is remembered; bias kept as is)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, fmt, block_size,
                double_quant, dtype=w.dtype if w.dtype in DTYPE_NAME else torch.float32, device="meta")
        q.set_weight(_quantize(w, q.spec))
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return q

    def set_weight(self, qt: QuantizedTensor) -> None:
        """Replace the weight (same shape and format)."""
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"qt must be a QuantizedTensor, got {type(qt).__name__}")
        if tuple(qt.shape) != (self.out_features, self.in_features) or qt.spec != self.spec:
            raise ValueError(f"weight {tuple(qt.shape)} {qt.spec} does not fit this layer "
                             f"({self.out_features}, {self.in_features}) {self.spec}")
        comps = qt.components()
        for name in _COMPONENTS:
            if name in comps:
                self._set_component(name, comps[name])
        self.weight_dtype = qt.dtype

    def _components(self) -> dict[str, torch.Tensor]:
        """The weight's tensors by name: buffers, or frozen parameters after lowbit.distributed.prepare_model."""
        out = {}
        for n in _COMPONENTS:
            t = self._parameters.get(n) if n in self._parameters else self._buffers.get(n)
            if t is not None:
                out[n] = t
        return out

    def _set_component(self, name: str, t: torch.Tensor) -> None:
        if name in self._parameters:  # frozen parameter (distributed): stays one, never trains
            self._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            self._buffers[name] = t

    def _pop_components(self) -> dict[str, tuple[bool, torch.Tensor]]:
        """Remove the components from both dicts: name -> (was a parameter, tensor)."""
        out = {}
        for n in _COMPONENTS:
            if n in self._parameters:
                out[n] = (True, self._parameters.pop(n))
            elif n in self._buffers:
                out[n] = (False, self._buffers.pop(n))
        return out

    def _restore_components(self, saved: dict[str, tuple[bool, torch.Tensor]]) -> None:
        for n, (is_param, t) in saved.items():
            if is_param:
                self._parameters[n] = t if t is None or isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            else:
                self._buffers[n] = t

    @property
    def weight(self) -> QuantizedTensor:
        comps = self._components()
        sharded = [n for n, t in comps.items() if is_dtensor(t)]
        if sharded:  # FSDP2 holds 1/world of each component between forwards
            raise RuntimeError(f"this QuantLinear's weight is sharded by FSDP2 (components {sharded} are DTensors): "
                               f"it exists whole only inside forward/backward; gather it with "
                               f"lowbit.distributed.full_state_dict(model)")
        return QuantizedTensor(self.spec, (self.out_features, self.in_features), self.weight_dtype, **comps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x, self.weight, self.bias)``. In plain eager inference on the CPU kernels (nothing to
        differentiate, no tracing) the kernel is called from the components themselves
        (:func:`lowbit.ops.gemm_inference`: the same door, the same bits), without rebuilding and
        re-checking a QuantizedTensor per call — at decode that cost 4× the kernel on small layers."""
        comps = self._components()
        y = ops.gemm_inference(x, tuple(comps.get(n) for n in _COMPONENTS), self.out_features, self.in_features,
                               self.spec.block_size, self.spec.fmt, self.bias)
        return y if y is not None else linear(x, self.weight, self.bias)

    # ---- state dict: the format travels with the tensors
    def get_extra_state(self) -> torch.Tensor:
        meta = {"fmt": self.spec.fmt, "block_size": self.spec.block_size, "double_quant": self.spec.double_quant,
                "shape": [self.out_features, self.in_features], "dtype": DTYPE_NAME[self.weight_dtype]}
        return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.weight_dtype = self._read_extra_state(state)

    def _read_extra_state(self, state) -> torch.dtype:
        """Validate the saved format description against this layer; return the weight's dtype."""
        if isinstance(state, torch.Tensor):
            if state.dtype != torch.uint8 or state.device.type == "meta":
                raise TypeError(f"QuantLinear extra state must be uint8 bytes of JSON, got {state.dtype} on "
                                f"{state.device}")
            meta = json_loads("QuantLinear extra state is corrupt", bytes(state.reshape(-1).tolist()))
        else:
            try:
                meta = dict(state)
            except (ValueError, TypeError) as e:
                raise ValueError(f"QuantLinear extra state is corrupt: {e}") from None
        spec, shape, dtype = parse_metadata(meta, "QuantLinear extra state")
        if spec != self.spec or shape != [self.out_features, self.in_features]:
            raise ValueError(f"state dict holds a {shape} {spec} weight; this layer is "
                             f"[{self.out_features}, {self.in_features}] {self.spec}")
        return dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Transactional: the whole incoming weight (extra state + every component) is validated by building
        # the new QuantizedTensor, and the bias is checked, before anything of this layer is assigned. nn.Module's
        # default copies buffer by buffer and fails half way (new codes beside old scales).
        extra_key = prefix + "_extra_state"
        dtype = self._read_extra_state(state_dict[extra_key]) if extra_key in state_dict else self.weight_dtype
        own_comps = self._components()
        names = list(own_comps)
        keys = {n: prefix + n for n in names}
        present = [n for n in names if keys[n] in state_dict]
        if present and len(present) != len(names):
            raise ValueError(f"state dict has {[keys[n] for n in present]} but lacks "
                             f"{[keys[n] for n in names if n not in present]}: a quantized weight loads whole or not at all")
        new = None
        if present:
            for n in names:
                if not isinstance(state_dict[keys[n]], torch.Tensor):
                    raise TypeError(f"state dict entry {keys[n]!r} must be a tensor, got {type(state_dict[keys[n]]).__name__}")
            new = QuantizedTensor(self.spec, (self.out_features, self.in_features), dtype,
                                  **{n: state_dict[keys[n]] for n in names})
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and (
                not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"state dict entry {prefix + 'bias'!r} must be a tensor of shape ({self.out_features},), "
                             f"got {tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        own = set(keys.values()) | {extra_key}
        if strict:  # nn.Module.load_state_dict always passes True here and filters missing keys itself
            missing_keys.extend(k for k in [*keys.values(), extra_key] if k not in state_dict)
        # the bias (and unexpected-key bookkeeping) by nn.Module, with the weight's buffers hidden from it
        saved = self._pop_components()
        n_errors, n_missing = len(error_msgs), len(missing_keys)
        try:
            super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in own}, prefix,
                                          local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        finally:
            self._restore_components(saved)
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k not in own]  # hidden above, not missing
        if new is None or len(error_msgs) != n_errors:
            return
        comps = new.components()
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            for n in names:
                t = comps[n].reshape(own_comps[n].shape)
                if assign:
                    self._set_component(n, t.contiguous())
                else:
                    own_comps[n].copy_(t)
        self.weight_dtype = dtype

    def _apply(self, fn, recurse=True):
        # Quantized components only change device, never dtype (model.half() must not cast scales).
        saved = self._pop_components()
        try:
            out = super()._apply(fn, recurse)
            probe = fn(torch.empty(0, device=saved["codes"][1].device))
            saved = {n: (p, None if t is None else t.to(probe.device)) for n, (p, t) in saved.items()}
        finally:
            self._restore_components(saved)
        return out

    def extra_repr(self) -> str:
        # from the components' global sizes (a sharded weight has no QuantizedTensor between forwards)
        nbytes = sum(t.numel() * t.element_size() for t in self._components().values())
        bits = 8 * nbytes / (self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fmt={self.spec.fmt!r}, block_size={self.spec.block_size}, double_quant={self.spec.double_quant}, "
                f"bits_per_weight={bits:.3f}")


def _quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    return quantize(w if w.dtype in DTYPE_NAME else w.float(), spec)
