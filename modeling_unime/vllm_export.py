"""``python -m modeling_unime.vllm_export``: the command line of `modeling_unime.export.vllm` (a UniME-V2 checkpoint
-> the stock-architecture layout vLLM serves), kept at this short, stable name."""

from .export.vllm import main

if __name__ == "__main__":
    main()
