"""The KV cache: paged memory taken as sequences advance, within a budget, shared by prefix.

Memory. One pool per model holds k and v for every layer as `n_blocks` blocks of
`block_size` (BS) token slots: tensors (n_layers, n_kv_heads, n_blocks * BS, head_dim). The
pool is sized by a byte budget but costs nothing until used: on CPU `torch.empty` maps pages
the kernel commits on first write, so resident memory follows the blocks written (on CUDA the
budget is reserved up front, as vLLM does). Block 0 is all zeros and never handed out: padded
gathers point at it.

A sequence's `BlockTable` maps logical block j (positions j*BS .. j*BS+BS-1) to a physical
block; position p lives in slot blocks[p // BS] * BS + p % BS and nothing moves once
written. Visibility stays a pure function of positions (DESIGN §2.1-2.2):

    visible(q_pos, k_pos) = k_pos >= 0  and  k_pos <= q_pos  and  q_pos - k_pos < W

Worked example, BS = 4, window W = 6, a sequence that has fed positions 0..9:

    logical block:   0        1        2
    positions:       0-3      4-7      8-9 (2 of 4 slots used)
    physical block:  -1       7        3           (block 0's positions left the window)

The next query is at position 10; it sees 5..10 (10-6+1 = 5 onwards), so logical block 0
(0-3) is given back when that step is planned (`trim`; not right after the step that fed 9,
so that the scheduler can register the blocks that step filled first), while block 1 stays:
position 4 is needed no more but 5-7 are. A sequence therefore holds at most
ceil(W / BS) + 1 blocks however long it runs. A chunk of T tokens is always written before
attention: nothing it overwrites can still be needed, because slots are never reused within
a sequence (the old rolling buffer had to attend to [cache ; chunk] and write afterwards).

Prefix reuse. A full block is named by a chain digest of every token up to its end
(blake2b(previous digest + its tokens)), so equal digests mean equal KV. Full blocks are
registered under their digest as they fill; when no sequence holds a registered block any
more it stays in the pool as cached (least recently used first to go when blocks run out).
A new sequence whose tokens start with registered blocks takes them instead of computing
them again: `reuse` finds the longest such prefix, leaving at least one token to feed (its
logits are needed). With a window only the blocks the next query can see must still be
there. Reuse is then made exact to the token: the leading slots of a cached block that
follows that prefix (a full one, or the partial last block a finished sequence left) are
copied when its first tokens are the next ones, e.g. a chat turn that resends the previous
prompt and answer. `fork` gives `n` choices of one prompt the same full blocks and a copy of the
partial last one.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from mistral7b.attention_plan import AttentionPlan, visible
from mistral7b.config import ModelConfig
from mistral7b.errors import InputError, Mistral7BError, ResourceError
from mistral7b.kernels import native

BLOCK_SIZE = 32


class KVCacheFull(Mistral7BError):
    """No free block even after evicting cached prefixes: the caller waits or preempts."""


@dataclass
class BlockTable:
    """One sequence's cache: `blocks[j]` is the physical block of logical block j (-1 = not
    held), `length` the number of positions written (the next position to feed)."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    digests: list[bytes] = field(default_factory=list)   # chain digests of its full blocks
    # where the digest chain starts: b"" for the base weights; a served LoRA adapter's KV
    # differs, so its sequences start from their own salt and share blocks only among them
    salt: bytes = b""
    # `trim` keeps what the query at this position sees (None: at `length`): a draft model's
    # table feeds guesses that may be cut back (draft.py), so it trims for its last real token
    trim_pos: int | None = None


def slot_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's k and v take over every layer."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * elem


class KVPool:
    """The paged k/v memory of one model and its prefix index (the engine owns it)."""

    def __init__(self, config: ModelConfig, budget_bytes: int, *, dtype: torch.dtype,
                 device: torch.device | str, block_size: int = BLOCK_SIZE) -> None:
        self.window = config.sliding_window
        self.block_size = bs = block_size
        self.slot_bytes = slot_bytes(config, dtype)
        self.block_bytes = self.slot_bytes * bs
        n_blocks = int(budget_bytes) // self.block_bytes + 1        # + the zero block
        if n_blocks < 2:
            raise InputError(
                f"a KV cache budget of {budget_bytes} bytes holds no block of {bs} tokens "
                f"({self.block_bytes} bytes): raise --kv-cache-memory / kv_cache_memory")
        self.n_blocks = n_blocks
        shape = (config.n_layers, config.n_kv_heads, n_blocks * bs, config.head_dim)
        try:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as exc:
            total = 2 * n_blocks * self.block_bytes
            raise ResourceError(
                f"could not allocate the KV cache: k and v of shape {list(shape)} in {dtype}, "
                f"{total} bytes ({total / 2**30:.2f} GiB) on {device} (the allocator said: "
                f"{str(exc).strip()[:200]}); lower kv_cache_memory= (CLI: --kv-cache-memory)"
            ) from None
        self.k[:, :, :bs] = 0
        self.v[:, :, :bs] = 0
        self.device = torch.device(device)
        # short steps' attention read in place (kernels/csrc/attention.cpp) where ours run,
        # for float32 queries (model.py asks only then)
        self.paged = native.ops() if self.device.type == "cpu" and dtype in (
            torch.float32, torch.bfloat16) else None
        self._free = list(range(1, n_blocks))           # a min-heap: low blocks first, so
        self._ref = [0] * n_blocks                      # the pages touched stay compact
        self._block_of: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        # blocks by the digest of the prefix before them, then by their tokens
        self._tails: dict[bytes, dict[tuple[int, ...], int]] = {}
        self._tail_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()   # cached, held by no sequence
        self.hits = 0                                   # tokens reused, for /metrics
        self.evictions = 0

    # ------------------------------------------------------------------ accounting

    @property
    def nbytes(self) -> int:
        """Bytes the pool may use (its budget); resident memory follows `used_bytes`."""
        return (self.n_blocks - 1) * self.block_bytes

    @property
    def capacity_blocks(self) -> int:
        return self.n_blocks - 1

    @property
    def available_blocks(self) -> int:
        """Blocks a sequence could take now: free ones and cached ones not held."""
        return len(self._free) + len(self._lru)

    @property
    def used_bytes(self) -> int:
        """Bytes in blocks held by sequences or kept as cached prefixes."""
        return (self.capacity_blocks - len(self._free)) * self.block_bytes

    @property
    def cached_bytes(self) -> int:
        """Bytes in blocks kept only as cached prefixes (reclaimable)."""
        return len(self._lru) * self.block_bytes

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks a sequence of n_tokens holds at its peak (a window caps it)."""
        bs = self.block_size
        if self.window is not None:
            n_tokens = min(n_tokens, self.window + bs)
        return -(-n_tokens // bs)

    # --------------------------------------------------------------- sequences

    def release(self, table: BlockTable, tokens: list[int] | None = None) -> None:
        """Give a finished (or preempted) sequence's blocks back. Registered full blocks stay
        cached; with `tokens`, so does its partial last block (the next chat turn starts
        with exactly these tokens, so it reuses them all, not just the full blocks)."""
        bs = self.block_size
        full, tail = divmod(table.length, bs)
        if tokens is not None and tail and len(table.digests) == full:
            b = table.blocks[full]
            key = table.digests[-1] if full else table.salt
            tail_tokens = tuple(tokens[full * bs: table.length])
            if b > 0 and self._ref[b] == 1 and b not in self._digest_of:
                self._index_tail(b, key, tail_tokens)
        for b in table.blocks:
            if b > 0:
                self._drop(b)
        table.blocks, table.length, table.digests = [], 0, []

    def reuse(self, table: BlockTable, tokens: list[int]) -> int:
        """Extend a table (empty, or one that ends on a block boundary) by the cached KV of
        its next tokens: the longest run of registered blocks, then the leading slots of a
        cached block, leaving at least one token to feed. Returns the tokens gained.

        Called at admission and again before each pre-fill chunk, so that requests admitted
        together with the same system prompt share it: the first computes a chunk, the
        others take it instead of computing it too."""
        bs, start = self.block_size, table.length
        j0 = start // bs
        if start % bs or len(table.blocks) != j0 or len(table.digests) != j0:
            return 0                        # a partial block of its own: nothing to add
        prev = table.digests[-1] if table.digests else table.salt
        digests = _chain(tokens[j0 * bs: (len(tokens) - 1) // bs * bs], bs, prev)
        present = np.array([d in self._block_of for d in digests], dtype=bool)
        missing_before = np.concatenate([[0], np.cumsum(~present)])   # missing in [j0, j0+i)
        m = next((m for m in range(len(digests), 0, -1)
                  if missing_before[m] == missing_before[self._needed_from(j0, m)]), 0)
        first = self._needed_from(j0, m)
        taken = [self._block_of[d] for d in digests[first:m]]
        for b in taken:
            self._hold(b)
        table.blocks += [-1] * first + taken
        table.digests += digests[:m]
        table.length = (j0 + m) * bs
        self._reuse_tail(table, tokens)
        self.hits += table.length - start
        return table.length - start

    def _needed_from(self, j0: int, m: int) -> int:
        """Of the m blocks after the table's j0, the index of the first one the query after
        them can see (0 without a window)."""
        return max(self._first_needed((j0 + m) * self.block_size) - j0, 0)

    def _reuse_tail(self, table: BlockTable, tokens: list[int]) -> None:
        """Extend a table that ends on a block boundary by the first n slots of a cached block
        that follows the same prefix (a full block, or the partial last block of a released
        sequence) whose first n tokens are the next ones: the longest such n that leaves a
        token to feed. The slots are copied, so the block stays cached for others."""
        key = table.digests[-1] if table.digests else table.salt
        start = table.length
        room = len(tokens) - 1 - start
        best, src = 0, -1
        for cached, b in self._tails.get(key, {}).items():
            n = 0
            for x, y in zip(cached[:room], tokens[start: start + room]):
                if x != y:
                    break
                n += 1
            if n > best:
                best, src = n, b
        if best == 0:
            return
        self._hold(src)                     # so that taking a block cannot evict it
        try:
            new = self._take()
        except KVCacheFull:
            return
        finally:
            self._drop(src)
        self._copy_slots(src, new, best)
        table.blocks.append(new)
        table.length += best

    def fork(self, table: BlockTable) -> BlockTable:
        """A second table with the same cached tokens: full blocks shared, the partial last
        block copied. Raises KVCacheFull when no block is left for the copy."""
        bs = self.block_size
        child = BlockTable(list(table.blocks), table.length, list(table.digests), table.salt)
        tail = table.length % bs
        if tail:
            new = self._take()
            self._copy_slots(table.blocks[-1], new, tail)
            child.blocks[-1] = new
        for b in child.blocks[: len(child.blocks) - (1 if tail else 0)]:
            if b > 0:
                self._hold(b)
        return child

    def register(self, table: BlockTable, tokens: list[int]) -> None:
        """Name the table's newly filled blocks by digest (tokens: at least its first
        `length`), so that later sequences can reuse them."""
        bs = self.block_size
        # min: a speculative step writes draft tokens that are not (yet) the sequence's own
        full = min(table.length, len(tokens)) // bs
        if len(table.digests) >= full:
            return
        prev = table.digests[-1] if table.digests else table.salt
        for j in range(len(table.digests), full):
            prev = _digest(prev, tokens[j * bs: (j + 1) * bs])
            table.digests.append(prev)
            b = table.blocks[j]
            if b > 0 and prev not in self._block_of and b not in self._digest_of:
                self._block_of[prev] = b
                self._digest_of[b] = prev
                self._index_tail(b, table.digests[-2] if j else table.salt,
                                 tuple(tokens[j * bs: (j + 1) * bs]))

    def truncate(self, table: BlockTable, length: int) -> None:
        """Forget positions >= length (rejected speculative draft tokens): blocks past the
        new end go back; slots past it in the last block are overwritten by later writes.
        Those positions were never registered (register names only the sequence's own
        tokens), and no block past the new end can be shared."""
        if length >= table.length:
            return
        keep = -(-length // self.block_size)
        for b in table.blocks[keep:]:
            if b > 0:
                self._drop(b)
        del table.blocks[keep:]
        del table.digests[length // self.block_size:]
        table.length = length

    def trim(self, table: BlockTable) -> None:
        """Give back the blocks no future query of the table can see (window only)."""
        if self.window is None:
            return
        pos = table.length if table.trim_pos is None else min(table.length, table.trim_pos)
        for j in range(self._first_needed(pos)):
            if table.blocks[j] > 0:
                self._drop(table.blocks[j])
                table.blocks[j] = -1

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (blocks held by running sequences stay)."""
        while self._lru:
            b, _ = self._lru.popitem(last=False)
            self._forget(b)
            heapq.heappush(self._free, b)

    # -------------------------------------------------------------------- steps

    def plan(self, tables: list[BlockTable], n_new: list[int]) -> tuple[AttentionPlan,
                                                                         torch.Tensor]:
        """Plan one forward step where batch entry b feeds n_new[b] tokens to tables[b].

        Takes the blocks the new tokens need (all or none: KVCacheFull before any change),
        advances the tables' lengths, and returns the plan and the absolute positions (B, T)
        of the chunk (padding included). Padding tokens are never written and no real query
        ever sees them.
        """
        if len(tables) != len(n_new) or not tables or min(n_new) < 1:
            raise ValueError("tables and n_new must be non-empty, equal in length, n >= 1")
        bs, dev = self.block_size, self.device
        for t in tables:        # here, not after the last step: its blocks were registered
            self.trim(t)        # since, so the ones leaving the window stay cached
        need = [-(-(t.length + n) // bs) - len(t.blocks) for t, n in zip(tables, n_new)]
        if sum(max(n, 0) for n in need) > self.available_blocks:
            raise KVCacheFull(f"{sum(need)} KV blocks needed, {self.available_blocks} free")
        for t, n in zip(tables, need):
            t.blocks.extend(self._take() for _ in range(n))

        B, T = len(tables), max(n_new)
        starts = [t.length for t in tables]
        ends = [s + n for s, n in zip(starts, n_new)]
        lo = [self._window_start(s) for s in starts]      # first key the chunk can see
        counts = torch.tensor(n_new, device=dev)
        positions = torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev)
        valid = torch.arange(T, device=dev)[None, :] < counts[:, None]             # (B, T)
        write_b, write_t = valid.nonzero(as_tuple=True)

        tables_t = [torch.tensor(t.blocks, dtype=torch.long) for t in tables]
        slot_lists = [_slots(tb, lo_b, end, bs) for tb, lo_b, end in zip(tables_t, lo, ends)]
        write_slot = torch.cat([s[len(s) - n:] for s, n in zip(slot_lists, n_new)]).to(dev)
        K = max(len(s) for s in slot_lists)
        k_pos = torch.full((B, K), -1, dtype=torch.long)
        gather = torch.zeros((B, K), dtype=torch.long)      # padding: the zero block
        for b, s in enumerate(slot_lists):
            k_pos[b, : len(s)] = torch.arange(lo[b], ends[b])
            gather[b, : len(s)] = s
        view = None
        first = int(gather[0, 0])
        if B == 1 and torch.equal(gather[0], torch.arange(first, first + K)):  # in order
            view = (first, first + K)
        k_pos = k_pos.to(dev)
        mask = visible(positions[:, :, None], k_pos[:, None, :], self.window)
        # Padding queries see everything: their output is discarded, and a fully masked row
        # would make softmax produce NaN.
        mask |= ~valid[:, :, None]
        for t, end in zip(tables, ends):
            t.length = end
        plan = AttentionPlan(mask[:, None], write_b, write_t, write_slot, view,
                             None if view else gather.to(dev))
        return plan, positions

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's chunk k/v (B, KV, T, D); return the keys/values to attend to,
        (B, KV, K, D), matching plan.mask's last dimension."""
        ck, cv = self._write(layer, k, v, plan)                             # (KV, S, D)
        if plan.view is not None:
            start, stop = plan.view
            return ck[None, :, start:stop], cv[None, :, start:stop]
        assert plan.gather is not None
        B, K = plan.gather.shape
        flat = plan.gather.reshape(-1)
        keys = ck.index_select(1, flat).view(-1, B, K, ck.shape[-1]).transpose(0, 1)
        values = cv.index_select(1, flat).view(-1, B, K, cv.shape[-1]).transpose(0, 1)
        return keys, values

    def paged_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        plan: AttentionPlan) -> torch.Tensor:
        """A short step's attention (at most PAGED_MAX_T tokens per row) read from the pool in
        place: store k/v (B, KV, T, D), then attend each query q (B*T, H, D) to its row's
        visible keys -> (B*T, H * D). Only where `self.paged` is set (our kernel library on
        the CPU, a float32 or bfloat16 pool) and q is float32; a decode step and a speculative verification step compute every
        query's numbers alike."""
        assert self.paged is not None
        ck, cv = self._write(layer, k, v, plan)
        _, gather, start, stop, mask = plan.query_keys()
        return self.paged.paged_attention(q, ck, cv, gather, start, stop, mask)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               plan: AttentionPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's chunk k/v (B, KV, T, D) in its slots; returns the layer's pools."""
        ck, cv = self.k[layer], self.v[layer]   # float32 k/v round to a bfloat16 pool here
        ck[:, plan.write_slot] = k[plan.write_b, :, plan.write_t].transpose(0, 1).to(ck.dtype)
        cv[:, plan.write_slot] = v[plan.write_b, :, plan.write_t].transpose(0, 1).to(cv.dtype)
        return ck, cv

    # ----------------------------------------------------------------- blocks

    def _index_tail(self, b: int, key: bytes, tokens: tuple[int, ...]) -> None:
        """Let `reuse` copy the leading slots of block b, which follows the prefix `key`."""
        if tokens not in self._tails.get(key, {}) and b not in self._tail_of:
            self._tails.setdefault(key, {})[tokens] = b
            self._tail_of[b] = (key, tokens)

    @torch.no_grad()
    def _copy_slots(self, src: int, dst: int, n: int) -> None:
        bs = self.block_size
        for pool in (self.k, self.v):
            pool[:, :, dst * bs: dst * bs + n] = pool[:, :, src * bs: src * bs + n]

    def _window_start(self, pos: int) -> int:
        return 0 if self.window is None else max(0, pos - self.window + 1)

    def _first_needed(self, next_pos: int) -> int:
        """First logical block the query at next_pos (and every later one) can see."""
        return self._window_start(next_pos) // self.block_size

    def _take(self) -> int:
        if self._free:
            b = heapq.heappop(self._free)
        elif self._lru:
            b, _ = self._lru.popitem(last=False)
            self._forget(b)
            self.evictions += 1
        else:
            raise KVCacheFull("no free KV block")
        self._ref[b] = 1
        return b

    def _hold(self, b: int) -> None:
        if self._ref[b] == 0:
            self._lru.pop(b, None)
        self._ref[b] += 1

    def _drop(self, b: int) -> None:
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if b in self._digest_of or b in self._tail_of:
                self._lru[b] = None            # most recently used goes last
            else:
                heapq.heappush(self._free, b)

    def _forget(self, b: int) -> None:
        d = self._digest_of.pop(b, None)
        if d is not None:
            self._block_of.pop(d, None)
        if b in self._tail_of:
            key, tail = self._tail_of.pop(b)
            del self._tails[key][tail]
            if not self._tails[key]:
                del self._tails[key]


def _digest(prev: bytes, tokens: list[int]) -> bytes:
    data = np.asarray(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(prev + data, digest_size=16).digest()


def _chain(tokens: list[int], bs: int, prev: bytes = b"") -> list[bytes]:
    out = []
    for j in range(len(tokens) // bs):
        prev = _digest(prev, tokens[j * bs: (j + 1) * bs])
        out.append(prev)
    return out


def _slots(table: torch.Tensor, lo: int, end: int, bs: int) -> torch.Tensor:
    """Pool slots of positions lo .. end-1 of a sequence whose block table is `table`."""
    pos = torch.arange(lo, end)
    return table[pos // bs] * bs + pos % bs
