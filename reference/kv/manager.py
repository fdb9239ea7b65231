"""KV memory managers: who owns which cache slots. The scheduler asks them; the model runner reads them.

Both managers describe the cache as [num_blocks, block_size] slots per layer (the tensors themselves are
allocated from these two numbers by layout.allocate_kv_caches) and give each sequence a block table.

- ContiguousKVManager (lab 0.2's starting point): a sequence reserves a whole row of max_model_len slots when
  it is admitted. It never runs out mid-request, so it never preempts, but it wastes every slot a sequence
  does not use and caps the batch at the number of rows.
- The paged BlockManager (block_manager.py, lab 0.3) hands out small blocks on demand; it can run out mid-request, which is
  why the scheduler knows how to preempt.

Swapping one for the other changes capacity and throughput, never the generated tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..sequence import Sequence


class KVCacheManager(ABC):
    num_blocks: int
    block_size: int

    @abstractmethod
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Could seq's cache grow to hold num_computed_tokens + num_new_tokens tokens (admitting it if new)?"""

    @abstractmethod
    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for seq's next num_new_tokens tokens (a new sequence's: those after cached_prefix_len(seq)).
        Call only after can_allocate said yes. Managers never write the sequence: the engine records its state."""

    @abstractmethod
    def free(self, seq: Sequence) -> None:
        """Return everything seq holds. Safe to call on a sequence that holds nothing."""

    @abstractmethod
    def block_table(self, seq: Sequence) -> list[int]:
        """seq's blocks in order: token at position p lives in slot table[p // block_size] * block_size + p % block_size."""

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @abstractmethod
    def num_reserved_slots(self) -> int:
        """Slots reserved by live sequences (used or not): internal fragmentation = reserved - used."""

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Give child (holding nothing) the parent's KV of its first num_tokens tokens (parallel sampling)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork sequences")

    def cached_prefix_len(self, seq: Sequence) -> int:
        """Tokens at the start of a new sequence whose KV is already cached (0 without prefix caching)."""
        return 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(source block, destination block) copies the model runner must do before the next forward pass."""
        return []


class ContiguousKVManager(KVCacheManager):
    """One row of max_model_len slots per admitted sequence, reserved until it finishes."""

    def __init__(self, max_num_seqs: int, max_model_len: int) -> None:
        self.num_blocks = max_num_seqs
        self.block_size = max_model_len
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))  # pop() hands out row 0 first
        self._row_of: dict[int, int] = {}  # seq_id -> row
        self._pending_copies: list[tuple[int, int]] = []

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        fits = seq.num_computed_tokens + num_new_tokens <= self.block_size
        return fits and (seq.seq_id in self._row_of or bool(self._free_rows))

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        assert self.can_allocate(seq, num_new_tokens), "allocate() without a successful can_allocate()"
        if seq.seq_id not in self._row_of:
            self._row_of[seq.seq_id] = self._free_rows.pop()

    def free(self, seq: Sequence) -> None:
        row = self._row_of.pop(seq.seq_id, None)
        if row is not None:
            self._free_rows.append(row)

    def block_table(self, seq: Sequence) -> list[int]:
        return [self._row_of[seq.seq_id]]

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        # Rows cannot be shared, so the child gets its own row and a copy of the parent's.
        self._row_of[child.seq_id] = self._free_rows.pop()
        self._pending_copies.append((self._row_of[parent.seq_id], self._row_of[child.seq_id]))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self._pending_copies = self._pending_copies, []
        return copies

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_rows)

    def num_reserved_slots(self) -> int:
        return len(self._row_of) * self.block_size
