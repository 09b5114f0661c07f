"""Sizes as people read them."""


def human_size(n: int) -> str:
    """Bytes as a person reads them: 1.23 GB, 456.00 MB. Decimal units, as the Hub and disk makers count;
    everything lorafuse prints (plan, progress, report) uses this one system."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
