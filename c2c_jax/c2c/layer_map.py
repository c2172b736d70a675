"""Layer alignment: which sharer layer each receiver layer reads (docs/upstream_reference.md §2.8)."""

from __future__ import annotations

LAYER_MAPS = ("terminal", "nearest")


def terminal_layer_map(receiver_layers: int, sharer_layers: int) -> tuple[int, ...]:
    """The paper's terminal alignment: top layers align, s(t) = clamp(t + M - N, 0, M - 1).

    With a shallower sharer the bottom receiver layers all read sharer layer 0 (as upstream).
    """
    offset = sharer_layers - receiver_layers
    return tuple(min(max(t + offset, 0), sharer_layers - 1) for t in range(receiver_layers))


def nearest_layer_map(receiver_layers: int, sharer_layers: int) -> tuple[int, ...]:
    """k-nearest with k = 1 on normalised depth t / (N - 1) vs s / (M - 1); the lower index wins ties."""
    def depth(i, n):
        return 0.0 if n == 1 else i / (n - 1)

    return tuple(
        min(range(sharer_layers), key=lambda s: (abs(depth(s, sharer_layers) - depth(t, receiver_layers)), s))
        for t in range(receiver_layers))


def layer_map(strategy: str, receiver_layers: int, sharer_layers: int) -> tuple[int, ...]:
    if strategy == "terminal":
        return terminal_layer_map(receiver_layers, sharer_layers)
    if strategy == "nearest":
        return nearest_layer_map(receiver_layers, sharer_layers)
    raise ValueError(f"unknown layer map {strategy!r}; choose one of {', '.join(LAYER_MAPS)}")
