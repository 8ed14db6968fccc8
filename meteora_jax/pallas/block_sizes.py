"""The rules every Pallas kernel's block sizes share."""

from __future__ import annotations


def is_tile_size(value: int) -> bool:
    """Triton's tile rule: a power of two >= 16."""
    return value >= 16 and not value & (value - 1)


def check_powers_of_two(blocks, names: tuple[str, ...]) -> None:
    """Each named field of `blocks` must be a power of two >= 16 (Triton's tile rule); None means automatic."""
    for name in names:
        value = getattr(blocks, name)
        if value is not None and not is_tile_size(value):
            raise ValueError(f"{name}={value} must be a power of two >= 16")


def check_num_warps(blocks, names: tuple[str, ...]) -> None:
    """Each named field of `blocks` must be a warp count Triton takes; None means automatic."""
    for name in names:
        warps = getattr(blocks, name)
        if warps is not None and warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"{name}={warps} must be 1, 2, 4, 8 or 16")
