"""Metal sources of the kernels; repo_mlx.rope reads rope.metal from here."""
