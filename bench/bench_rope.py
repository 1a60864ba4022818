"""The continuous rotation alone: repo_mlx's custom function against the unfused ops.

Rotates queries and keys of one layer by per-head real positions, as a RePo
layer does, and times, forward and forward + backward:

    unfused     the rotation as separate MLX ops, q and k one after the other
                (what the model did before it had its own kernels)
    compiled    the pure-MLX path alone (mx.compile'd, q and k together)
    custom      repo_mlx.continuous_rope_qk: the Metal kernels on an Apple GPU,
                the compiled pure path everywhere else
    kernels off continuous_rope_qk with rope.set_kernels(False): the pure path
                behind the custom function (what REPO_MLX_KERNELS=0 runs)

Variants alternate within each round; each time is the median over rounds,
reported as a ratio to "unfused" measured in the same run.

NEEDS A MAC: on a machine without Metal (mx.metal.is_available() is False),
"custom" is the compiled pure-MLX path on the CPU, so its ratios say nothing
about the Metal kernels. The script prints which path ran.

    python bench/bench_rope.py                   # 1B shapes: 16 heads of 128
    python bench/bench_rope.py --tokens 512 --rounds 5
"""

import argparse
import platform
import statistics
import time

import mlx.core as mx

from repo_mlx import rope


def unfused_rotate(x, z, inv_freq):
    angles = z.astype(mx.float32)[..., None] * inv_freq
    cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def variants(inv_freq):
    one = mx.array(1.0, mx.float32)

    def custom(q, k, z):
        return rope.continuous_rope_qk(q, k, z, inv_freq=inv_freq)

    def kernels_off(q, k, z):
        rope.set_kernels(False)
        try:
            return custom(q, k, z)
        finally:
            rope.set_kernels(True)

    return {
        "unfused": lambda q, k, z: (unfused_rotate(q, z, inv_freq), unfused_rotate(k, z, inv_freq)),
        "compiled": lambda q, k, z: rope._forward(q, k, z, inv_freq, one),
        "custom": custom,
        "kernels off": kernels_off,
    }


def with_backward(fn, gq, gk):
    def loss(q, k, z):
        a, b = fn(q, k, z)
        return (a * gq).sum() + (b * gk).sum()

    return mx.grad(loss, argnums=(0, 1, 2))


def seconds(fn, args, iters):
    mx.eval(fn(*args))  # warm up (and compile)
    tic = time.perf_counter()
    for _ in range(iters):
        mx.eval(fn(*args))
    return (time.perf_counter() - tic) / iters


def bench(batch, tokens, heads, head_dim, dtype, rounds, iters, backward):
    mx.random.seed(0)
    # q and k as the model hands them over: head-split views of [B, N, heads * D].
    q, k, gq, gk = (
        mx.random.normal((batch, tokens, heads, head_dim)).astype(dtype).transpose(0, 2, 1, 3)
        for _ in range(4)
    )
    z = (mx.random.uniform(-2000, 2000, (batch, tokens, heads))).transpose(0, 2, 1)
    inv_freq = rope.inv_frequencies(head_dim, 500000.0)
    fns = variants(inv_freq)
    if backward:
        fns = {name: with_backward(fn, gq, gk) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn, (q, k, z), iters))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1, help="Batch size (default: 1).")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 1], help="Sequence lengths to time: prefill-like and decode-like (default: 2048 1).")
    p.add_argument("--heads", type=int, default=16, help="Attention heads (default: 16, the 1B).")
    p.add_argument("--head-dim", type=int, default=128, help="Head dimension (default: 128, the 1B).")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"], help="Dtype of q/k (default: bfloat16).")
    p.add_argument("--rounds", type=int, default=7, help="Alternating rounds; the median is reported (default: 7).")
    p.add_argument("--iters", type=int, default=10, help="Calls timed per round (default: 10).")
    args = p.parse_args()
    dtype = getattr(mx, args.dtype)

    probe = mx.zeros((1, 1, 1, args.head_dim), dtype)
    metal = rope._use_kernels(probe, probe, mx.zeros((1, 1, 1)))
    print(
        f"device {mx.default_device()}, {platform.machine()} {platform.system()}; "
        f"rotation path: {'Metal kernels' if metal else 'compiled pure MLX (no Metal)'}"
    )
    if not metal:
        print("NOTE: no Metal here, so 'custom' is not the kernel; its ratios need a Mac.")
    print(f"{args.batch} x {args.heads} heads x {args.head_dim}, {args.dtype}, "
          f"median of {args.rounds} rounds x {args.iters} calls, ratio = time / unfused")  # fmt: skip
    for tokens in args.tokens:
        for backward in (False, True):
            t = bench(
                args.batch, tokens, args.heads, args.head_dim, dtype,
                args.rounds, args.iters, backward,
            )  # fmt: skip
            what = "forward + backward" if backward else "forward"
            print(f"\nN = {tokens}, {what}")
            for name, s in t.items():
                print(f"  {name:11s} {s * 1e3:9.3f} ms   ratio {s / t['unfused']:.2f}")
    if metal and rope._state["failure"]:
        print(f"\nNOTE: the kernels failed ({rope._state['failure']}); 'custom' ran the pure path.")


if __name__ == "__main__":
    main()
