"""What the fused-linear op tests share."""


def backend_keywords(mode: str) -> dict:
    """The ``fused_linear_turn_kl`` keywords that run ``mode``: ``"triton"``, or the torch
    backend's ``"slab"`` / ``"stream"`` chunk mode."""
    return dict(backend="triton") if mode == "triton" else dict(backend="torch", chunk_mode=mode)
