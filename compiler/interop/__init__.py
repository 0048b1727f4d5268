"""Interoperability with other model libraries: `moec.interop.transformers` imports Hugging Face
transformers MoE configs and weights."""
