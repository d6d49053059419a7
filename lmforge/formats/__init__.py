"""Readers and writers for the ecosystem's model formats: GGUF (llama.cpp) and HF folders."""
