"""Bytes on disk: reading and writing the safetensors format."""
