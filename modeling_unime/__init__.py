"""UniME-V2 for Hugging Face transformers: embedder, processor, judge, miner.

Importing this package registers the UniME-V2 classes with ``AutoConfig``, ``AutoModel`` and ``AutoProcessor``, and
marks them for auto classes so that a saved checkpoint carries its own code (``auto_map``) and loads elsewhere with
``AutoModel.from_pretrained(path, trust_remote_code=True)``.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_unime import SUPPORTED_BACKBONES, UniMEV2Config
from .modeling_unime import UniMEV2Model, UniMEV2Output, UniMEV2PreTrainedModel
from .processing_unime import UniMEV2Processor

__version__ = "0.1.0"


def _register() -> None:
    try:
        AutoConfig.register(UniMEV2Config.model_type, UniMEV2Config)
    except ValueError:  # already registered (e.g. the module was reloaded)
        pass
    try:
        AutoModel.register(UniMEV2Config, UniMEV2Model)
    except ValueError:
        pass
    try:
        AutoProcessor.register(UniMEV2Config, UniMEV2Processor)
    except ValueError:
        pass
    UniMEV2Config.register_for_auto_class()
    UniMEV2Model.register_for_auto_class("AutoModel")
    UniMEV2Processor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "SUPPORTED_BACKBONES",
    "UniMEV2Config",
    "UniMEV2Model",
    "UniMEV2Output",
    "UniMEV2PreTrainedModel",
    "UniMEV2Processor",
]
