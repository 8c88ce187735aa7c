"""asv suites for :mod:`pagetable.prefix`: the block hashes of prefix caching.

Every suite takes an ``algorithm`` parameter over :data:`pagetable.prefix.ALGORITHMS`,
so ``asv compare`` and the graphs show the four side by side; an algorithm whose
package (``cbor2``, ``xxhash``: ``pip install 'pagetable[prefix]'``) is missing is
skipped.  ``HashPrompt`` is the figure ``tools/hash_throughput.py`` prints (tokens/s =
tokens / time), measured by asv's sampling instead of a best-of loop.

Commits from before :mod:`pagetable.prefix` existed skip every suite.
"""

import numpy as np

try:
    from pagetable import prefix
except ImportError:  # commits before pagetable.prefix
    prefix = None

ALGORITHMS = ["sha256", "sha256_cbor", "xxhash", "xxhash_cbor"]
BLOCK_SIZE = 16


def _tokens(count, seed=0):
    return np.random.default_rng(seed).integers(0, 152_000, size=count).tolist()


def _usable(algorithm):
    """Raise asv's skip (NotImplementedError) when ``algorithm`` cannot run here."""
    if prefix is None:
        raise NotImplementedError("pagetable.prefix is not in this commit")
    try:
        prefix.hash_function(algorithm)
    except ImportError as exc:
        raise NotImplementedError(str(exc)) from None


def _extra_keys(num_tokens):
    """A LoRA adapter and a 100-token multimodal item every 500 tokens."""
    return prefix.ExtraKeys(
        lora_name="adapter", lora_path="/adapters/adapter",
        mm=[(f"item-{i}", offset, 100) for i, offset in enumerate(range(0, num_tokens - 100, 500))])


class HashPrompt:
    """``hash_prompt`` of one prompt: every full block, chained (block size 16)."""

    params = (ALGORITHMS, [512, 8192, 100_000], [False, True])
    param_names = ["algorithm", "tokens", "extra_keys"]

    def setup(self, algorithm, num_tokens, with_extra_keys):
        _usable(algorithm)
        self.tokens = _tokens(num_tokens)
        self.extra = _extra_keys(num_tokens) if with_extra_keys else None

    def time_hash_prompt(self, algorithm, num_tokens, with_extra_keys):
        prefix.hash_prompt(self.tokens, BLOCK_SIZE, self.extra, algorithm, seed="0")


class HashPromptFromArray:
    """``hash_prompt`` given an int32 numpy array, as an engine's token buffer holds them."""

    params = (ALGORITHMS,)
    param_names = ["algorithm"]

    def setup(self, algorithm):
        _usable(algorithm)
        self.tokens = np.array(_tokens(8192), dtype=np.int32)

    def time_hash_prompt(self, algorithm):
        prefix.hash_prompt(self.tokens, BLOCK_SIZE, None, algorithm, seed="0")


class HashBlockTokens:
    """One decode step's work for one sequence: hash the block that just filled."""

    params = (ALGORITHMS,)
    param_names = ["algorithm"]

    def setup(self, algorithm):
        _usable(algorithm)
        self.parent = prefix.none_hash(algorithm, "0")
        self.block = _tokens(BLOCK_SIZE)

    def time_hash_block_tokens(self, algorithm):
        prefix.hash_block_tokens(self.parent, self.block, None, algorithm)


class ExtraKeysForBlock:
    """``ExtraKeys.for_block`` / ``event_keys`` over a long prompt with many items."""

    params = ([10, 200],)
    param_names = ["items"]

    def setup(self, items):
        if prefix is None:
            raise NotImplementedError("pagetable.prefix is not in this commit")
        self.blocks = items * 500 // BLOCK_SIZE
        self.extra = _extra_keys(items * 500 + 100)

    def time_for_block(self, items):
        for k in range(self.blocks):
            self.extra.for_block(k, BLOCK_SIZE)

    def time_event_keys(self, items):
        for k in range(self.blocks):
            self.extra.event_keys(k, BLOCK_SIZE)


class DynamoBlockHashes:
    """Dynamo's router-local hash of every full block (XXH3-64 over u32 tokens)."""

    params = ([512, 100_000],)
    param_names = ["tokens"]

    def setup(self, num_tokens):
        _usable("xxhash")
        self.tokens = _tokens(num_tokens)

    def time_dynamo_block_hashes(self, num_tokens):
        prefix.dynamo_block_hashes(self.tokens, BLOCK_SIZE)
