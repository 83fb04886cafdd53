"""Evaluation harness: MMEB (36 datasets), zero-shot image-text retrieval (Flickr30K, COCO, ShareGPT4V, Urban1K),
SugarCrepe; each with an optional rerank stage. Metrics are local `evaluate` modules under ``evaluation/metrics``."""
