"""Quantization: formats, the lab's QuantizedVector and LLM.int8(), whole-model methods, QAT and real kernels."""
