"""Error feedback: what a lossy codec drops in one encode is added to the next update."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ._fused import all_finite
from ._pipeline import Codec, TensorLike, _to_tensor
from ._wire import FLOAT_DTYPES


class ErrorFeedback:
    """Wrap a codec so that its compression error is carried over, not lost (EF / EF21-style memory).

    Each :meth:`encode` sends ``codec(update + residual)`` and keeps
    ``residual = (update + residual) - decode(blob)``; summed over rounds, what the receiver
    decodes plus the final residual equals what was given. The residual is computed from the
    decoded blob itself, so it matches what the receiver sees bit for bit.

    Parameters
    ----------
    codec : Codec | str
        The codec to wrap, or its spec.
    """

    def __init__(self, codec: Codec | str) -> None:
        self.codec = codec if isinstance(codec, Codec) else Codec(codec)
        self.residual: dict[str, torch.Tensor] = {}

    def encode(self, update: Mapping[str, TensorLike]) -> bytes:
        """Encode ``update`` plus the carried residual; update the residual.

        Each tensor is sent in its own dtype; the residual is kept in float32 (what a float16
        tensor loses to its own rounding is carried over too). Every blob sent decodes to finite
        values; one that would not is refused (see :meth:`Codec.encode_rebuilt`) and the residual
        is left as it was.
        """
        tensors = {name: _to_tensor(name, v) for name, v in update.items()}
        corrected, sent = {}, {}
        for name, t in tensors.items():
            res = self.residual.get(name)
            if t.dtype in FLOAT_DTYPES and res is not None and res.shape == t.shape:
                # float32, the usual dtype, without the conversions that would return their input
                corrected[name] = (t if t.dtype == torch.float32 else t.to(torch.float32)) + res
                sent[name] = corrected[name] if t.dtype == torch.float32 else corrected[name].to(t.dtype)
            else:
                sent[name] = t
        if self.codec.lossless:
            self.residual = {}
            return self.codec.encode(sent)
        try:
            # what the receiver will decode, from the encoder's parts: parsing the own blob cost more
            # than the residual arithmetic on small models (the same tensors bit for bit, tested)
            blob, decoded = self.codec.encode_rebuilt(sent)
        except ValueError as err:
            raise _residual_overflow(tensors, sent) or err from None
        self.residual = {
            name: _minus(corrected.get(name), c, decoded[name]) for name, c in sent.items() if c.dtype in FLOAT_DTYPES
        }
        return blob

    def state_dict(self, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """Residuals (``residual/<name>``) and the codec's state (``codec/<key>``), flat.

        With ``copy=False`` the residuals are this object's own tensors, for a caller that
        serializes them at once (the next :meth:`encode` replaces them, it does not change them).
        """
        out = {f"residual/{k}": v.clone() if copy else v for k, v in self.residual.items()}
        out.update({f"codec/{k}": v for k, v in self.codec.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], *, copy: bool = True) -> None:
        """Restore what :meth:`state_dict` returned.

        With ``copy=False`` the residual tensors are taken as they are, for a caller that made them
        for this object alone (from serialized state) and does not change them afterwards.

        Raises
        ------
        ValueError
            For a key other than ``residual/<name>`` or ``codec/<key>``, a residual that is not
            finite float32, or codec state the codec refuses (see :meth:`Codec.load_state_dict`).
        TypeError
            For a value that is not a tensor. Nothing is loaded when anything is raised.
        """
        residual, codec_state = {}, {}
        for key, value in state.items():
            head, _, rest = key.partition("/")
            if head == "residual" and rest:
                residual[rest] = _checked_residual(key, value, copy)
            elif head == "codec" and rest:
                codec_state[rest] = value
            else:
                raise ValueError(f"unexpected error-feedback state key {key!r}; expected 'residual/...' or 'codec/...'")
        self.codec.load_state_dict(codec_state)
        self.residual = residual


def _residual_overflow(given: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> ValueError | None:
    """The error naming a tensor that is finite but not with the residual added, if there is one."""
    for name, t in given.items():
        if t.dtype in FLOAT_DTYPES and all_finite(t) and not all_finite(sent[name]):
            return ValueError(
                f"update[{name!r}] plus the error-feedback residual carried over from the last encode holds "
                f"values beyond {sent[name].dtype}'s range; scale the updates down or reset the residual"
            )
    return None


def _checked_residual(key: str, value: object, copy: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"error-feedback state {key!r} must be a torch.Tensor, found {type(value).__name__}")
    if value.dtype != torch.float32:
        raise ValueError(f"error-feedback state {key!r} must be float32, found {value.dtype}")
    if not all_finite(value):
        raise ValueError(f"error-feedback state {key!r} holds NaN or infinite values")
    return value.clone() if copy else value


def _minus(corrected: torch.Tensor | None, sent: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """The new residual, float32: ``corrected`` (or ``sent`` where no residual was added) minus ``decoded``.

    ``corrected`` is a tensor of this encode's own (update + residual), so the difference is
    written into it: one allocation of the model's size less per round. ``decoded`` may be that
    very tensor (sent raw); the difference is then zero, as it should be.
    """
    decoded = decoded if decoded.dtype == torch.float32 else decoded.to(torch.float32)
    if corrected is None:
        return sent.to(torch.float32) - decoded
    return corrected.sub_(decoded)
