"""Where and how recipes run their models: the process's device, bf16 on accelerators, an attention kernel.

Every recipe and evaluation entry point loads its models through these helpers, so that ``accelerate launch`` on a
GPU node puts each process's models on its own GPU in bf16, while CPU runs (tests, CI) stay in float32.

The rules, in one place:

- **device**: the process's device under ``accelerate launch`` / ``torchrun`` (``PartialState().device``:
  ``cuda:<local rank>``...), ``cpu`` where there is no accelerator.
- **dtype** ``"auto"``: bfloat16 on an accelerator that supports it (float16 on an older GPU without bf16),
  float32 on CPU; an explicit ``"float32"`` / ``"bfloat16"`` / ``"float16"`` / ``torch.dtype`` is honoured.
  Training weights follow `training_dtype` (bf16 frozen base under adapters, float32 master weights otherwise).
- **attn_implementation** ``"auto"``: ``flash_attention_2`` where the flash-attn package, a CUDA device and a half
  precision compute dtype are all there, else ``sdpa``. Asking for ``flash_attention_2`` where it cannot run is an
  error that says why, never a silent fallback.

Example:
    >>> import torch
    >>> resolve_dtype("auto", "cpu"), resolve_dtype("float16", "cpu"), resolve_dtype(torch.bfloat16, "cpu")
    (torch.float32, torch.float16, torch.bfloat16)
    >>> resolve_attn_implementation("auto", torch.float32, "cpu"), resolve_attn_implementation("eager")
    ('sdpa', 'eager')
    >>> where = placement("auto", "auto", device="cpu")
    >>> where["device"], where["dtype"], where["attn_implementation"]
    (device(type='cpu'), torch.float32, 'sdpa')
    >>> pretrained_kwargs(where)["dtype"]
    torch.float32
    >>> training_dtype("auto", "cpu", mixed_precision="bf16", finetuning="dora")
    torch.float32
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, TypedDict

import torch

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
HALF_DTYPES = (torch.bfloat16, torch.float16)
ADAPTER_FINETUNING = ("lora", "dora")


class Placement(TypedDict):
    """Where a model runs: its device, the dtype of its weights and its attention kernel."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str


# ------------------------------------------------------------------------------------------------------ device


def accelerator_available() -> bool:
    """True where torch sees an accelerator (CUDA, ROCm, XPU, MPS...), False on a CPU-only machine."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def process_state() -> Any:
    """The ``accelerate.PartialState`` of this process (a shared singleton: the first call decides).

    Without an accelerator it must be asked for CPU explicitly: otherwise each process of
    ``accelerate launch --multi_gpu`` on a CPU machine believes it is alone.
    """
    from accelerate import PartialState

    return PartialState(cpu=not accelerator_available())


def process_device() -> torch.device:
    """The device of this process under ``accelerate launch`` / ``torchrun`` (``cuda:<local rank>``, ``cpu``...)."""
    return torch.device(process_state().device)


# ------------------------------------------------------------------------------------------------------ dtype


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively (CPU: emulated in software, so no; GPUs before Ampere: no)."""
    device = torch.device(device)
    if device.type == "cpu":
        return False
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True  # xpu, mps (macOS 14+), npu, hpu; a CUDA device asked about on a machine without one


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype to load weights in: ``"auto"`` (or None) means bf16 on an accelerator, float32 on CPU.

    Unlike ``from_pretrained(dtype="auto")`` this ignores the checkpoint's stored dtype: the released checkpoints are
    bf16, which on CPU is slow and less exact than the float32 the tests compare against. A GPU without bf16 (V100,
    T4) gets float16; the judge and the reranker raise a clear error if its logits overflow.
    """
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPE_NAMES)} (or a torch.dtype).")
    return getattr(torch, dtype)


def default_mixed_precision() -> str | None:
    """The Trainer's mixed precision when a config names none: ``"bf16"`` on a CUDA GPU with bf16 (Ampere or later),
    else None (float32; other accelerators and older GPUs choose explicitly with ``bf16: true`` / ``fp16: true``).

    Example:
        >>> default_mixed_precision() == ("bf16" if torch.cuda.is_available() and bf16_supported("cuda") else None)
        True
    """
    return "bf16" if torch.cuda.is_available() and bf16_supported("cuda") else None


def training_dtype(
    dtype: str | torch.dtype | None,
    device: torch.device | str,
    mixed_precision: str | None,
    finetuning: str,
) -> torch.dtype:
    """The dtype to load weights in for training; an explicit ``dtype`` is honoured.

    ``"auto"``:

    - on CPU: float32;
    - on an accelerator, with bf16 mixed precision and an adapter (``finetuning`` lora / dora): **bfloat16**. This
      is the authors' setting (bf16 weights, ``--bf16``, DoRA): the frozen base weights are never updated, so bf16
      loses nothing there and halves their memory (a 7B base: 15 GB instead of 30 GB per GPU), while peft keeps
      the trainable adapter weights in float32 and the Trainer computes under bf16 autocast;
    - otherwise (``finetuning: full``, fp16 or no mixed precision): **float32** master weights under autocast
      (standard mixed precision). An optimizer step on bf16 weights rounds away any relative change below
      2^-8 (0.4%), i.e. most AdamW updates at learning rates of 1e-5 to 1e-4; fp16 AMP needs float32 weights.

    Example:
        >>> training_dtype("auto", "cuda", "bf16", "dora"), training_dtype("auto", "cuda", "bf16", "full")
        (torch.bfloat16, torch.float32)
        >>> training_dtype("float16", "cuda", "fp16", "lora")   # explicit: honoured
        torch.float16
    """
    device = torch.device(device)
    if dtype not in (None, "auto"):
        chosen = resolve_dtype(dtype, device)
        if chosen in HALF_DTYPES and finetuning not in ADAPTER_FINETUNING:
            logger.warning(
                "Training every weight stored in %s: optimizer updates smaller than the weights' precision are "
                "rounded away. Prefer dtype: auto (float32 master weights with bf16: true).", chosen,
            )
        return chosen
    if device.type == "cpu":
        return torch.float32
    if mixed_precision == "bf16" and finetuning in ADAPTER_FINETUNING:
        return torch.bfloat16
    return torch.float32


# ------------------------------------------------------------------------------------------------------ attention


def flash_attention_installed() -> bool:
    """Whether the flash-attn 2 package is importable (whatever the device)."""
    try:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return True
    except ImportError:  # pragma: no cover - transformers always has it
        pass
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention_available(device: torch.device | str | None = None) -> bool:
    """Whether ``flash_attention_2`` can run here: the package, and a CUDA ``device`` (any CUDA GPU when None)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and flash_attention_installed()


def resolve_attn_implementation(
    attn_implementation: str | None = "auto",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> str:
    """The attention kernel: ``"auto"`` (or None) picks ``flash_attention_2`` when it can run, else ``sdpa``.

    ``dtype`` is the dtype attention computes in (the weights' dtype, or the autocast dtype when training under
    mixed precision): flash-attn computes in float16 / bfloat16 only, so ``"auto"`` picks it only then, and an explicit
    ``"flash_attention_2"`` with float32 is an error. ``device`` (None: any CUDA GPU) must be a CUDA device.
    """
    if attn_implementation in (None, "auto"):
        half = dtype is None or dtype in HALF_DTYPES
        return "flash_attention_2" if half and flash_attention_available(device) else "sdpa"
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={attn_implementation!r}: use one of {', '.join(ATTN_IMPLEMENTATIONS)}.")
    if attn_implementation == "flash_attention_2":
        if not flash_attention_installed():
            raise ValueError(
                "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed "
                "(pip install flash-attn --no-build-isolation, on a CUDA machine); use 'sdpa' or 'auto' otherwise."
            )
        if not flash_attention_available(device):
            where = f"device {torch.device(device)}" if device is not None else "no CUDA device"
            raise ValueError(
                f"attn_implementation='flash_attention_2' needs a CUDA GPU, and this process has {where}; "
                "use 'sdpa' or 'auto' otherwise."
            )
        if dtype is not None and dtype not in HALF_DTYPES:
            raise ValueError(
                f"attn_implementation='flash_attention_2' computes in float16 / bfloat16 only, and the model would "
                f"run in {dtype}: set dtype: bfloat16 (or auto), or use 'sdpa'."
            )
    return attn_implementation


# ------------------------------------------------------------------------------------------------------ together


def placement(
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "auto",
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Placement:
    """``device``, ``dtype`` and ``attn_implementation`` for this process, resolved as documented above.

    Args:
        dtype: the weights' dtype (``"auto"``, a name, a ``torch.dtype``).
        attn_implementation: ``"auto"``, ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
        device: defaults to this process's device (`process_device`).
        compute_dtype: the dtype attention runs in when it differs from the weights' (training under autocast).
    """
    device = torch.device(device) if device is not None else process_device()
    resolved = resolve_dtype(dtype, device)
    return Placement(
        device=device,
        dtype=resolved,
        attn_implementation=resolve_attn_implementation(attn_implementation, compute_dtype or resolved, device),
    )


def pretrained_kwargs(where: Placement, device_map: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained``: dtype, attention, and (``device_map=True``, for inference) the
    process's device as ``device_map``, so the weights are read straight onto it: eight processes of an 8-GPU node
    then do not each hold a 7B model in host memory first. Training leaves ``device_map`` out: the Trainer (or
    DeepSpeed / FSDP, which refuse a device map) places the model."""
    kwargs: dict[str, Any] = {"dtype": where["dtype"], "attn_implementation": where["attn_implementation"]}
    if device_map:
        kwargs["device_map"] = {"": where["device"]}
    return kwargs


def place(
    model: torch.nn.Module,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> torch.nn.Module:
    """Move a model (e.g. a tiny one built in memory) to ``device`` and, if given, ``dtype``; switch its attention
    kernel (every sub-model's) when ``attn_implementation`` is given.

    Example:
        >>> layer = place(torch.nn.Linear(2, 2), "cpu", torch.bfloat16)
        >>> layer.weight.device.type, layer.weight.dtype
        ('cpu', torch.bfloat16)
    """
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    # After the move: transformers checks flash-attn against the weights' device and dtype.
    if attn_implementation is not None and hasattr(model, "set_attn_implementation"):
        if attention_kernels(model) != {attn_implementation}:
            model.set_attn_implementation(attn_implementation)
    return model


def describe(model: torch.nn.Module, name: str = "model") -> str:
    """One line saying where a model is: ``"judge: cuda:0 torch.bfloat16 attention=sdpa"``.

    The attention is read from the backbone's attention modules, i.e. what really runs (``mixed`` if they differ).

    Example:
        >>> describe(torch.nn.Linear(2, 2), "head")
        'head: cpu torch.float32 attention=n/a'
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else None
    kernels = attention_kernels(model)
    if not kernels:
        attention = "n/a"
    else:
        attention = kernels.pop() if len(kernels) == 1 else "mixed(" + ",".join(sorted(kernels)) + ")"
    return f"{name}: {device} {dtype} attention={attention}"


def attention_kernels(model: torch.nn.Module) -> set[str]:
    """The ``_attn_implementation`` of the config of every attention module (language model and vision tower)."""
    kernels = set()
    for module_name, module in model.named_modules():
        config = getattr(module, "config", None)
        if module_name.endswith(("self_attn", ".attn")) and config is not None:
            kernels.add(config._attn_implementation)
    return kernels


__all__ = [
    "ADAPTER_FINETUNING",
    "ATTN_IMPLEMENTATIONS",
    "DTYPE_NAMES",
    "Placement",
    "accelerator_available",
    "attention_kernels",
    "bf16_supported",
    "default_mixed_precision",
    "describe",
    "flash_attention_available",
    "flash_attention_installed",
    "place",
    "placement",
    "pretrained_kwargs",
    "process_device",
    "process_state",
    "resolve_attn_implementation",
    "resolve_dtype",
    "training_dtype",
]
