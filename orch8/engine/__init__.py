"""The engine: the claim loop (`worker`), one instance's run (`executor`), group commit."""
