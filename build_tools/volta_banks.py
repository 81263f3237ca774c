"""A model of the Volta kernel's shared-memory bank use, to check the layout
derivation of xla_ffi/cuda/sm70/attention_sm70.cu without a GPU.

Shared memory has 32 banks of 4 bytes. A warp's 8-byte loads are served per
half-warp: 16 lanes, 64 words of 4 bytes; two lanes reading the same
address share it (broadcast), two distinct addresses in one bank cost an
extra pass. `passes` counts the passes of one half-warp access.
"""
from __future__ import annotations


def swizzle(row: int, swizzled: bool = True) -> int:
    """g(r) of the kernel (FASTATTN_VOLTA_SWIZZLE=1), or 0 (naive layout)."""
    if not swizzled:
        return 0
    return (row & 3) | ((((row >> 3) ^ (row >> 2)) & 1) << 2) | (((row >> 4) & 1) << 3)


def chunk_address(row: int, chunk: int, head_dim: int, swizzled: bool) -> int:
    """Byte address of 8-byte chunk `chunk` of tile row `row`."""
    return 8 * (row * (head_dim // 4) + (chunk ^ swizzle(row, swizzled)))


def passes(addresses) -> int:
    """Passes one half-warp needs for these 8-byte loads (bank-conflict degree)."""
    by_bank = {}
    for address in set(addresses):
        for word in (address // 4, address // 4 + 1):
            by_bank.setdefault(word % 32, set()).add(word)
    return max(len(words) for words in by_bank.values())


def fragment_loads(head_dim: int, swizzled: bool):
    """(name, [passes of each half-warp access]) of the kernel's three
    fragment loads, over every chunk and block of one key tile."""
    q_loads, k_loads, v_loads = [], [], []
    for warp in range(4):
        for chunk in range(head_dim // 4):
            for h in (0, 1):  # lanes 0-15 and 16-31
                rows = [warp * 32 + qp * 8 + l + 4 * h for qp in range(4) for l in range(4)]
                q_loads.append(passes(chunk_address(r, chunk, head_dim, swizzled) for r in rows))
                for block in range(4):
                    keys = [block * 8 + l + 4 * h for l in range(4)]
                    k_loads.append(passes(chunk_address(r, chunk, head_dim, swizzled) for r in keys))
    for block in range(4):
        for low_keys in ((0, 1, 4, 5), (2, 3, 6, 7)):
            for d_block in range(head_dim // 8):
                for h in (0, 1):
                    keys = [block * 8 + key for key in low_keys]
                    v_loads.append(passes(chunk_address(r, 2 * d_block + h, head_dim, swizzled) for r in keys))
    return [("Q (A, row-major)", q_loads), ("K (B, col-major)", k_loads), ("V (B, row-major)", v_loads)]


def table(head_dim: int = 64) -> str:
    """Markdown: worst and mean passes per half-warp access, both layouts."""
    lines = ["| operand load | naive worst | naive mean | swizzled worst | swizzled mean |", "|---|---|---|---|---|"]
    naive = fragment_loads(head_dim, False)
    swizzled = fragment_loads(head_dim, True)
    for (name, a), (_, b) in zip(naive, swizzled):
        lines.append(f"| {name} | {max(a)} | {sum(a) / len(a):.2f} | {max(b)} | {sum(b) / len(b):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for d in (64, 128):
        print(f"head_dim {d}\n{table(d)}\n")
