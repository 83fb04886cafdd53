"""UniME-V2 for Hugging Face transformers: embedder, processor, judge, miner.

Importing this package registers the UniME-V2 classes with ``AutoConfig``, ``AutoModel`` and ``AutoProcessor``, and
marks them for auto classes so that a saved checkpoint carries its own code (``auto_map``) and loads elsewhere with
``AutoModel.from_pretrained(path, trust_remote_code=True)``.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_unime import SUPPORTED_BACKBONES, UniMEV2Config, UniMEV2RerankerConfig
from .modeling_unime import UniMEV2Model, UniMEV2Output, UniMEV2PreTrainedModel, UniMEV2Reranker
from .processing_unime import UniMEV2Processor

__version__ = "0.1.0"


def _register() -> None:
    for config_class, model_class in ((UniMEV2Config, UniMEV2Model), (UniMEV2RerankerConfig, UniMEV2Reranker)):
        for register in (
            lambda: AutoConfig.register(config_class.model_type, config_class),
            lambda: AutoModel.register(config_class, model_class),
            lambda: AutoProcessor.register(config_class, UniMEV2Processor),
        ):
            try:
                register()
            except ValueError:  # already registered (e.g. the module was reloaded)
                pass
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    UniMEV2Processor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "SUPPORTED_BACKBONES",
    "UniMEV2Config",
    "UniMEV2Model",
    "UniMEV2Output",
    "UniMEV2PreTrainedModel",
    "UniMEV2Processor",
    "UniMEV2Reranker",
    "UniMEV2RerankerConfig",
]
