"""Evaluation harness: MMEB (36 datasets), MMEB-V2 (78 image, video and visual-document tasks, `evaluation.mmeb_v2`),
zero-shot image-text retrieval (Flickr30K, COCO, ShareGPT4V, Urban1K), SugarCrepe; each but MMEB-V2 with an optional
rerank stage. Metrics are local `evaluate` modules under ``evaluation/metrics``."""
