"""Run the reference model and the Cython manager through the same calls.

``cython_lacks(feature)`` says why a docs/HYBRID.md feature cannot be compared yet
(the compiled manager predates it) and ``needs_cython(...)`` skips a test for that
reason; once the Cython side lands, the tests turn on by themselves.
"""

import numpy as np
import pytest

from pagetable import AdmissionResult, AppendResult, KVCacheManager, OutOfBlocksError
from pagetable.reference import ReferenceKVCacheManager


def _probe(feature):
    """None when the compiled manager has ``feature``, else what it lacks."""
    try:
        if feature == "windows":
            KVCacheManager(4, 2, sliding_window=2)
            KVCacheManager(4, 2, attention_chunk=2, group_idx=1)
        elif feature == "lookahead":
            empty = np.zeros(0, dtype=np.int64)
            if not hasattr(AppendResult(empty, empty.astype(np.int32), empty.astype(np.int32)), "lookahead_slots"):
                return "AppendResult.lookahead_slots"
            kv = KVCacheManager(4, 2)
            kv.add_sequence(0, 1)
            kv.append_tokens([0], 0, num_lookahead=1)
        elif feature == "truncate":
            for name in ("truncate", "rollback", "_truncate_check"):
                if not hasattr(KVCacheManager, name):
                    return name
        elif feature == "admission":
            for name in ("can_admit", "reset"):
                if not hasattr(KVCacheManager, name):
                    return name
            KVCacheManager(4, 2).add_sequences([0], num_tokens=[1])
        elif feature == "hooks":
            for name in ("_hit_mask", "_admission_plan", "_admit", "_append_plan", "_append", "_truncate_check"):
                if not hasattr(KVCacheManager, name):
                    return name
        else:
            raise ValueError(feature)
    except TypeError:
        return feature
    return None


_LACKS = {f: _probe(f) for f in ("windows", "lookahead", "truncate", "admission", "hooks")}


def cython_lacks(*features):
    missing = [_LACKS[f] for f in features if _LACKS[f]]
    return ", ".join(missing) if missing else None


def needs_cython(*features):
    """Skip the test while the compiled manager lacks one of ``features``."""
    missing = cython_lacks(*features)
    return pytest.mark.skipif(missing is not None, reason=f"Cython manager lacks {missing}")


def implementations(*features):
    """Parameters ``impl`` for a hand-computed test: the reference always, the Cython
    manager once it has ``features``."""
    return pytest.mark.parametrize("impl", [
        "reference", pytest.param("cython", marks=needs_cython(*features))])


def make(impl, num_blocks, block_size, **options):
    cls = ReferenceKVCacheManager if impl == "reference" else KVCacheManager
    return cls(num_blocks, block_size, **options)


def random_workload(pair, rng, steps, lookahead=True, truncate=True, admission=True):
    """Random adds, appends (with lookahead), forks, truncates, rollbacks, frees and
    batched admissions on both managers of ``pair``; every call compared."""
    size = pair.ref.block_size
    caching = pair.ref.enable_prefix_caching
    next_id = [0]
    prefixes = [list(rng.integers(0, 3, size=3 * size + 1)) for _ in range(2)]

    def prompt():
        base = prefixes[int(rng.integers(0, 2))][:int(rng.integers(0, 3 * size + 2))]
        return [int(t) for t in base] + [int(t) for t in rng.integers(0, 3, size=int(rng.integers(0, size + 2)))]

    for _ in range(steps):
        live = [s for s in pair.seqs]
        what = int(rng.integers(0, 9))
        if what == 0 or not live:
            seq = next_id[0]
            next_id[0] += 1
            tokens = prompt()
            pair.add(seq, len(tokens), token_ids=tokens if caching else None)
        elif what == 1 and admission:
            prompts = [prompt() for _ in range(int(rng.integers(1, 4)))]
            seqs = list(range(next_id[0], next_id[0] + len(prompts)))
            next_id[0] += len(prompts)
            if caching:
                pair(lambda m: m.add_sequences(seqs, token_ids=prompts))
            else:
                pair(lambda m: m.add_sequences(seqs, num_tokens=[len(p) for p in prompts]))
            pair.track(*seqs)
        elif what in (2, 3, 4):
            ids = list(rng.choice(live, size=min(len(live), int(rng.integers(1, 4))), replace=False))
            ids = [int(s) for s in ids]
            counts = [int(c) for c in rng.integers(0, 2 * size + 1, size=len(ids))]
            k = int(rng.integers(0, size + 2)) if lookahead and rng.random() < 0.5 else 0
            tokens = [int(t) for t in rng.integers(0, 3, size=sum(counts))]
            kwargs = {"num_lookahead": k} if lookahead else {}
            pair(lambda m: m.append_tokens(ids, counts, token_ids=tokens if caching else None, **kwargs))
        elif what == 5:
            parent = int(rng.choice(live))
            child = next_id[0]
            next_id[0] += 1
            pair(lambda m: m.fork(parent, child))
            pair.track(child)
        elif what == 6 and truncate:
            ids = [int(s) for s in rng.choice(live, size=min(len(live), 2), replace=False)]
            lengths = pair.ref.seq_lens(ids).tolist()
            if rng.random() < 0.5:
                rejected = [int(rng.integers(0, n + 2)) for n in lengths]
                pair(lambda m: m.rollback(ids, rejected))
            else:
                targets = [int(rng.integers(0, n + 2)) for n in lengths]
                pair(lambda m: m.truncate(ids, targets))
        elif what == 7:
            seq = int(rng.choice(live))
            pair(lambda m: m.free_sequence(seq))
        else:
            tokens = prompt()
            pair(lambda m: m.count_cached_tokens(tokens))
            if admission:
                pair(lambda m: m.can_admit(len(tokens), token_ids=tokens if caching else None,
                                           watermark=0.1))
    pair(lambda m: m.reset() if admission else m.free_sequence(list(pair.seqs)))


def plain(result):
    """A result (or list of results) as plain data."""
    if isinstance(result, (list, AdmissionResult)):
        return [plain(r) for r in result]
    if isinstance(result, AppendResult):
        out = (result.slots.tolist(), result.copy_src.tolist(), result.copy_dst.tolist(),
               result.num_cached_tokens)
        if hasattr(result, "lookahead_slots"):
            out += (result.lookahead_slots.tolist(),)
        return out
    if isinstance(result, np.ndarray):
        return result.tolist()
    if isinstance(result, tuple):
        return tuple(plain(r) for r in result)
    return result


def outcome(call):
    """The call's result as plain data, or the exception it raised (type, and the
    counts of an OutOfBlocksError)."""
    try:
        return plain(call())
    except OutOfBlocksError as error:
        return ("OutOfBlocksError", error.requested, error.available)
    except (KeyError, ValueError, TypeError, OverflowError) as error:
        return ("raised", type(error).__name__)


def event_data(event):
    name = type(event).__name__.lstrip("_")
    if name == "BlockStored":
        return (name, list(event.block_hashes), event.parent_block_hash, list(event.token_ids),
                event.block_size, event.lora_id, event.medium, event.lora_name,
                event.extra_keys, event.group_idx)
    if name == "BlockRemoved":
        return (name, list(event.block_hashes), event.medium, event.group_idx)
    return (name,)


def state(m):
    """Everything observable about a manager, for comparisons and "unchanged" checks."""
    seqs = sorted(int(s) for s in m._blocks) if isinstance(m, ReferenceKVCacheManager) else None
    every = np.arange(m.num_blocks)
    out = {"free": m.num_free_blocks, "len": len(m),
           "refcount": m.allocator.refcount(every).tolist()}
    if seqs is not None:
        out["seqs"] = seqs
    if getattr(m, "prefix_caching", None) or getattr(m, "enable_prefix_caching", None):
        s = m.prefix_cache_stats
        out["stats"] = (s.requests, s.queries, s.hits, s.evictions)
        out["cached"] = m.num_cached_blocks
    return out


def view(m, seqs):
    """What a batch of sequences looks like: lengths, block table, FlashInfer layout."""
    return (m.seq_lens(seqs).tolist(), m.block_table(seqs).tolist(),
            [a.tolist() for a in m.flashinfer_layout(seqs)])


class Pair:
    """A reference manager and (when ``compare``) a Cython one, built alike, driven
    alike, compared after every call."""

    def __init__(self, num_blocks, block_size, compare=True, **options):
        self.ref = ReferenceKVCacheManager(num_blocks, block_size, **options)
        self.fast = KVCacheManager(num_blocks, block_size, **options) if compare else None
        self.events_on = options.get("enable_kv_cache_events", False)
        self.seqs = []

    def managers(self):
        return [self.ref] + ([self.fast] if self.fast is not None else [])

    def __call__(self, call):
        """Run ``call`` on each; same outcome, same events, same state; a call that
        raises changes nothing."""
        before = [(state(m), view(m, self.seqs)) for m in self.managers()]
        results = [outcome(lambda m=m: call(m)) for m in self.managers()]
        events = [[event_data(e) for e in m.take_events().events] if self.events_on else []
                  for m in self.managers()]
        self.ref.check()
        if self.fast is not None:
            self.fast.check()
            assert results[1] == results[0], ("cython", results[1], "reference", results[0])
            assert events[1] == events[0], ("cython", events[1], "reference", events[0])
        self.seqs = [s for s in self.seqs if s in self.ref]
        after = [(state(m), view(m, self.seqs)) for m in self.managers()]
        if self.fast is not None:
            assert {k: v for k, v in after[1][0].items() if k != "seqs"} == \
                {k: v for k, v in after[0][0].items() if k != "seqs"}
            assert after[1][1] == after[0][1], ("cython", after[1][1], "reference", after[0][1])
            assert self.fast.allocator._free_blocks().tolist() == self.ref.allocator._free_stack
        if isinstance(results[0], tuple) and results[0] and results[0][0] in ("raised", "OutOfBlocksError"):
            assert [(state(m), view(m, self.seqs)) for m in self.managers()] == before
        self.last_events = events[0]
        return results[0]

    def add(self, seq, *args, **kwargs):
        result = self(lambda m: m.add_sequence(seq, *args, **kwargs))
        if seq in self.ref and seq not in self.seqs:
            self.seqs.append(seq)
        return result

    def track(self, *seqs):
        self.seqs += [s for s in seqs if s in self.ref and s not in self.seqs]
