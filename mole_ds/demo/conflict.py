"""Token tasks whose domains conflict for adapter capacity (the conflict study's data, generated in-process).

Every sample is a short prompt that names its domain, and a one-token answer that depends on the domain:
the same input means something different in each domain, so one adapter trained on the mix must hold every
domain's mapping at once, while an adapter per domain (or an expert per domain) holds one.

Two variants (``K`` symbols per alphabet, ``D`` domains, ``pi_d`` a random permutation of the answers per
domain, drawn so that no input gets the same answer in two domains):

``table``  prompt ``[BOS, DOM_d, x, SEP]`` -> ``pi_d(x)``. A lookup table of D x K unrelated facts. Any
           balanced split of the facts relieves an adapter equally, so routing by the input symbol x is as
           good as routing by domain. Evaluated on the whole table (each (d, x) once): the task is to hold the
           table, there is nothing to generalise to.
``rule``   prompt ``[BOS, DOM_d, a, b, c, SEP]`` with a, b, c from three separate alphabets (slots) ->
           ``pi_d(slot_d)``: the domain says which slot to read (domain d reads slot d mod 3) and the answer
           maps that slot's symbol. The other two slots are distractors. A split by domain gives each expert
           one rule; a split by the inputs leaves every expert with every rule. Trained on a fixed set of
           (a, b, c) triples; evaluated on held-out triples never seen in training (with every domain).

Vocabulary: ``PAD, BOS, SEP``, then D domain tokens, then the input alphabets, then K answer tokens.
Domains are drawn independently per sample, so a mixed batch interleaves them (no blocks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VARIANTS = ("table", "rule")
PAD, BOS, SEP = 0, 1, 2
SLOTS = 3
"""Input slots of the ``rule`` variant."""


@dataclass
class ConflictTask:
    """One drawn task: vocabulary layout, the per-domain answer maps and the train / eval inputs."""

    variant: str
    num_domains: int
    symbols: int
    answer_maps_DK: torch.Tensor
    """(D, K) int64: ``pi_d(x)`` as an answer index 0..K-1."""
    train_inputs_NS: torch.Tensor
    """(N, slots) int64 symbol indices 0..K-1 the training batches draw from."""
    eval_inputs_MS: torch.Tensor
    """(M, slots) held-out symbol indices (``table``: every x; ``rule``: triples not in the training set)."""

    @property
    def slots(self) -> int:
        return 1 if self.variant == "table" else SLOTS

    @property
    def vocab_size(self) -> int:
        return 3 + self.num_domains + (self.slots + 1) * self.symbols

    @property
    def prompt_len(self) -> int:
        return 3 + self.slots

    def domain_token(self, d_B: torch.Tensor) -> torch.Tensor:
        return 3 + d_B

    def input_tokens(self, x_BS: torch.Tensor) -> torch.Tensor:
        """Slot s symbol k -> its token (each slot has its own alphabet)."""
        offs_S = torch.arange(self.slots, dtype=torch.long) * self.symbols
        return 3 + self.num_domains + offs_S + x_BS

    def answer_token(self, a_B: torch.Tensor) -> torch.Tensor:
        return 3 + self.num_domains + self.slots * self.symbols + a_B

    def answers(self, d_B: torch.Tensor, x_BS: torch.Tensor) -> torch.Tensor:
        """Answer index of each (domain, inputs): ``pi_d(x)`` or ``pi_d(slot_{d mod 3})``."""
        read_B = torch.zeros_like(d_B) if self.variant == "table" else d_B % SLOTS
        return self.answer_maps_DK[d_B, x_BS.gather(1, read_B[:, None]).squeeze(1)]

    def encode(self, d_B: torch.Tensor, x_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt token ids (B, prompt_len), answer token ids (B,))."""
        B = d_B.shape[0]
        ids_BL = torch.cat([torch.full((B, 1), BOS), self.domain_token(d_B)[:, None], self.input_tokens(x_BS),
                            torch.full((B, 1), SEP)], dim=1)
        return ids_BL, self.answer_token(self.answers(d_B, x_BS))

    def sample(self, gen: torch.Generator, batch: int, domains: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: each sample's domain drawn uniformly from ``domains`` (interleaved per sample) and
        its inputs from the training set. Returns (domain ids (B,), inputs (B, slots)); see :meth:`encode`."""
        dom = torch.tensor(domains, dtype=torch.long)
        d_B = dom[torch.randint(len(domains), (batch,), generator=gen)]
        x_BS = self.train_inputs_NS[torch.randint(self.train_inputs_NS.shape[0], (batch,), generator=gen)]
        return d_B, x_BS

    def eval_set(self, domain: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held-out input under one domain: (inputs (M, slots), prompt ids (M, L), answer ids (M,))."""
        x_MS = self.eval_inputs_MS
        d_M = torch.full((x_MS.shape[0],), domain, dtype=torch.long)
        ids_ML, ans_M = self.encode(d_M, x_MS)
        return x_MS, ids_ML, ans_M


def _conflicting_permutations(D: int, K: int, gen: torch.Generator, tries: int = 10_000) -> torch.Tensor:
    """D permutations of 0..K-1 with pi_d(x) != pi_e(x) for every x and d != e (so every input conflicts)."""
    if D > K:
        raise ValueError(f"domains ({D}) must be <= symbols ({K}) for every input to conflict across domains")
    maps = [torch.randperm(K, generator=gen)]
    while len(maps) < D:
        for _ in range(tries):
            p = torch.randperm(K, generator=gen)
            if all(bool((p != m).all()) for m in maps):
                maps.append(p)
                break
        else:
            raise RuntimeError(f"no conflicting permutation found in {tries} tries (D={D}, K={K})")
    return torch.stack(maps)


def make_task(variant: str, num_domains: int = 3, symbols: int = 16, seed: int = 0,
              train_fraction: float = 0.5) -> ConflictTask:
    """Draw a task. ``train_fraction`` (``rule`` only): share of the K^3 triples used for training; the rest
    is the held-out set."""
    if variant not in VARIANTS:
        raise ValueError(f"variant ({variant!r}) must be one of {', '.join(VARIANTS)}")
    if num_domains < 1 or symbols < 2:
        raise ValueError(f"num_domains ({num_domains}) must be >= 1 and symbols ({symbols}) >= 2")
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    maps_DK = _conflicting_permutations(num_domains, symbols, gen)
    if variant == "table":
        every = torch.arange(symbols)[:, None]
        return ConflictTask(variant, num_domains, symbols, maps_DK, every, every)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction ({train_fraction}) must be in (0, 1)")
    grid = torch.cartesian_prod(*[torch.arange(symbols)] * SLOTS)  # (K^3, 3)
    order = torch.randperm(grid.shape[0], generator=gen)
    n_train = int(round(train_fraction * grid.shape[0]))
    return ConflictTask(variant, num_domains, symbols, maps_DK, grid[order[:n_train]], grid[order[n_train:]])
