"""The ground floor of the package: shared primitives that import nothing else of it, one module per concern (as
sentence-transformers splits its ``util/``).

- `retrieval`: the chunked top-k search of mining and of every retrieval benchmark;
- `embedding_cache`: embeddings on disk, keyed by the embedder's fingerprint and each item ("embed what is missing");
- `fingerprint`: hashes of a model's weights and of a processor's settings, the keys of every cache;
- `files`: atomic writes and the warning for a damaged cache file;
- `statistics`: ranks with ties (the judge audits);
- `images`: checking that the image files a job names exist, before any model runs;
- `arguments`: recipe arguments as dataclasses, from a YAML file and flags.
"""
