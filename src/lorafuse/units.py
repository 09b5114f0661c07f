"""Sizes and names as people read them."""

import re


def human_size(n: int) -> str:
    """Bytes as a person reads them: 1.23 GB, 456.00 MB. Decimal units, as the Hub and disk makers count;
    everything lorafuse prints (plan, progress, report) uses this one system."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def natural(name: str) -> list:
    """Sort key that reads numbers as numbers: layers.2 before layers.10 (safetensors orders names as strings)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]
