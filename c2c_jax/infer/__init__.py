"""Inference: decoding, the jitted programs and `Generator`, fuser files, continuous batching."""
