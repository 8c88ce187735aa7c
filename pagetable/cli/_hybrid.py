"""``pagetable simulate --model hybrid`` and ``--spec-decode``: what the simulation
counts beside the single-manager figures.

The hybrid model is two KV-cache groups (``docs/HYBRID.md``): one of full-attention
layers and one of sliding-window layers, the window group standing for
``--window-ratio`` layers per full-attention layer (Gemma-style 5:1 by default).  Each
group is sized as the full group (``--num-blocks`` pages), so the window group never
runs short first and the figures show how much of it a window leaves unused.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from pagetable import PAD_SLOT_ID, KVCacheGroupSpec

DEFAULT_WINDOW = 1024
DEFAULT_WINDOW_RATIO = 5


def group_specs(args: argparse.Namespace) -> list[KVCacheGroupSpec]:
    """The full-attention group, then the sliding-window group."""
    return [KVCacheGroupSpec(args.num_blocks, args.block_size),
            KVCacheGroupSpec(args.num_blocks, args.block_size, sliding_window=args.window)]


def accepted_drafts(rng: np.random.Generator, count: int, drafts: int, accept_rate: float) -> np.ndarray:
    """Draft tokens accepted per sequence: each draft in order is accepted with
    probability ``accept_rate`` until the first rejection (at most ``drafts``)."""
    if accept_rate >= 1.0:
        return np.full(count, drafts, dtype=np.int64)
    return np.minimum(rng.geometric(1.0 - accept_rate, size=count) - 1, drafts).astype(np.int64)


class HybridAccount:
    """Blocks each group holds step by step, and the window group's released entries."""

    def __init__(self, num_groups: int) -> None:
        self.held_sum = np.zeros(num_groups, dtype=np.int64)
        self.held_peak = np.zeros(num_groups, dtype=np.int64)
        self.requests_sum = 0
        self.steps = 0
        self.released = 0                       # window entries padded, over the run
        self.padded_now: dict[int, int] = {}    # seq id -> its padded entries last seen

    def step(self, held: list[int], running_requests: int) -> None:
        if not running_requests:
            return
        self.held_sum += held
        np.maximum(self.held_peak, held, out=self.held_peak)
        self.requests_sum += running_requests
        self.steps += 1

    def window_table(self, seq_ids: np.ndarray, table: np.ndarray, kernel_blocks_per_block: int) -> None:
        """Count the released (padded) entries at the head of each window row that are
        new since the row was last seen: a padded entry stays padded."""
        if not table.size:
            return
        held = table != PAD_SLOT_ID
        leading = np.where(held.any(axis=1), held.argmax(axis=1), 0) // kernel_blocks_per_block
        for seq, pads in zip(seq_ids.tolist(), leading.tolist()):
            before = self.padded_now.get(seq, 0)
            if pads > before:
                self.released += pads - before
            self.padded_now[seq] = pads

    def forget(self, seq_ids: Any) -> None:
        for seq in seq_ids:
            self.padded_now.pop(int(seq), None)

    def figures(self, args: argparse.Namespace, stats: tuple[Any, ...]) -> dict[str, Any]:
        per_request = (self.held_sum / self.requests_sum).tolist() if self.requests_sum else [0.0, 0.0]
        full, window = per_request
        layer_blocks = full + args.window_ratio * window
        all_full = full * (1 + args.window_ratio)
        return {
            "window": args.window,
            "window_ratio": args.window_ratio,
            "blocks_per_request": {"full": full, "window": window},
            "peak_blocks": {"full": int(self.held_peak[0]), "window": int(self.held_peak[1])},
            "layer_blocks_per_request": layer_blocks,
            "all_full_layer_blocks_per_request": all_full,
            "memory_vs_all_full": layer_blocks / all_full if all_full else None,
            "blocks_released_by_window": self.released,
            "prefix_hit_rate": {name: (s.hits / s.queries if s.queries else 0.0)
                                for name, s in zip(("full", "window"), stats)},
        }


def summary(figures: dict[str, Any]) -> list[str]:
    lines = []
    hybrid = figures.get("hybrid")
    if hybrid:
        per, ratio = hybrid["blocks_per_request"], hybrid["memory_vs_all_full"]
        rates = hybrid["prefix_hit_rate"]
        lines += [
            f"  hybrid model       full attention + sliding window of {hybrid['window']} tokens "
            f"({hybrid['window_ratio']} window layers per full layer), one pool per group",
            f"                     blocks per running request: full group {per['full']:.1f}, window group "
            f"{per['window']:.1f}; {hybrid['layer_blocks_per_request']:.1f} layer-blocks against "
            f"{hybrid['all_full_layer_blocks_per_request']:.1f} all-full: "
            + ("-" if ratio is None else f"{100 * ratio:.1f}% of the memory"),
            f"                     the window released {hybrid['blocks_released_by_window']:,} blocks; "
            f"peak blocks held: full {hybrid['peak_blocks']['full']}, window {hybrid['peak_blocks']['window']}; "
            f"prefix hit rate per group: full {100 * rates['full']:.1f}%, window {100 * rates['window']:.1f}%",
        ]
    spec = figures.get("spec_decode")
    if spec:
        share = spec["rolled_back"] / spec["draft_slots"] if spec["draft_slots"] else 0.0
        lines.append(
            f"  speculative decode {spec['drafts']} drafts per step, accept rate {spec['accept_rate']:g}: "
            f"{spec['draft_slots']:,} lookahead slots reserved, {spec['rolled_back']:,} rolled back "
            f"({100 * share:.1f}%), {spec['accepted']:,} drafts accepted")
    if figures["config"].get("kernel_block_size"):
        lines.append(f"  kernel blocks      block tables exported in kernel blocks of "
                     f"{figures['config']['kernel_block_size']} tokens every step")
    return lines
