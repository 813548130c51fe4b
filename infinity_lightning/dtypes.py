"""One parser for dtype names, used by recipes, the command line and the Python API alike."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["parse_dtype", "DTYPE_NAMES", "dtype_name", "native_bf16", "auto_precision"]

#: Accepted spellings (lower case) -> dtype.  Lightning precision strings map to their compute dtype.
DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "32": torch.float32,
    "32-true": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "16": torch.float16,
    "16-mixed": torch.float16,
}


def parse_dtype(value: Union[None, str, torch.dtype], allowed: Optional[Sequence[torch.dtype]] = None,
                what: str = "dtype", default: Optional[torch.dtype] = None) -> Optional[torch.dtype]:
    """A torch dtype from a dtype, a name (``"bf16"``, ``"float32"``, ``"torch.bfloat16"``) or None.

    ``None`` gives ``default``.  A name that is not a dtype, or a dtype outside ``allowed``, is a
    ``ValueError`` naming ``what`` and the accepted values.
    """
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        dtype = value
    else:
        key = str(value).strip().lower().removeprefix("torch.")
        dtype = DTYPE_NAMES.get(key)
        if dtype is None:
            names = sorted({"fp32", "bf16", "fp16"} if allowed is None else {dtype_name(d) for d in allowed})
            raise ValueError(f"{what} {value!r} is not a dtype; expected one of {', '.join(names)}")
    if allowed is not None and dtype not in allowed:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(dtype_name(d) for d in allowed)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype (``fp32``, ``bf16``, ``fp16``), or its torch name."""
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` computes bf16 matrix products natively (CUDA with bf16 support, or
    a CPU with AVX-512 bf16 / AMX); elsewhere bf16 is emulated and far slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def auto_precision(accelerator: str = "auto") -> str:
    """The Lightning precision ``"auto"`` stands for: ``bf16-mixed`` where bf16 is native on the
    chosen accelerator, ``32-true`` otherwise."""
    accelerator = str(accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if native_bf16("cuda") else "32-true"
    return "bf16-mixed" if native_bf16("cpu") else "32-true"
