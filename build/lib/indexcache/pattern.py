"""IndexCache F/S patterns: which DSA layers keep their indexer (F) and which reuse one (S).

The uniform schedule is the serving engines' formula, verbatim (transformers 5.23 `GlmMoeDsaConfig`, vLLM,
SGLang): layer i is F iff `max(i - offset + 1, 0) % freq == 0`. Training and serving must pick the same layers,
so nothing here re-derives it differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

FULL, SHARED = "F", "S"
_TYPE_OF = {FULL: "full", SHARED: "shared"}
_CHAR_OF = {v: k for k, v in _TYPE_OF.items()}


def uniform_is_full(layer: int, freq: int, offset: int) -> bool:
    return max(layer - offset + 1, 0) % freq == 0


@dataclass(frozen=True)
class IndexCachePattern:
    """A validated pattern string over {F, S}, one character per DSA layer."""

    value: str

    def __post_init__(self) -> None:
        if not self.value:
            raise ValueError("IndexCache pattern is empty: give one F/S character per DSA layer")
        for pos, char in enumerate(self.value):
            if char not in _TYPE_OF:
                raise ValueError(
                    f"IndexCache pattern has illegal character {char!r} at position {pos}: use only 'F' and 'S'"
                )
        if self.value[0] != FULL:
            raise ValueError(
                "IndexCache pattern starts with 'S' at position 0: layer 0 must be 'F' (it has no F layer to reuse)"
            )

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, num_layers: int) -> IndexCachePattern:
        text = text.strip().upper()
        pattern = cls(text)
        if len(text) != num_layers:
            raise ValueError(
                f"IndexCache pattern has {len(text)} characters but the model has {num_layers} DSA layers: "
                f"give exactly {num_layers} F/S characters"
            )
        return pattern

    @classmethod
    def uniform(cls, num_layers: int, freq: int, offset: int = 2) -> IndexCachePattern:
        if freq < 1:
            raise ValueError(f"pattern.freq={freq} is invalid: use an integer >= 1 (1 keeps every indexer)")
        if offset < 1:
            raise ValueError(f"pattern.offset={offset} is invalid: use an integer >= 1 (engines default to 2)")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} is invalid: a pattern needs at least one layer")
        return cls("".join(FULL if uniform_is_full(i, freq, offset) else SHARED for i in range(num_layers)))

    @classmethod
    def all_full(cls, num_layers: int) -> IndexCachePattern:
        return cls(FULL * num_layers)

    @classmethod
    def from_indexer_types(cls, indexer_types: list[str]) -> IndexCachePattern:
        chars = []
        for pos, kind in enumerate(indexer_types):
            if kind not in _CHAR_OF:
                raise ValueError(f"indexer_types[{pos}]={kind!r} is not 'full' or 'shared'")
            chars.append(_CHAR_OF[kind])
        return cls("".join(chars))

    @classmethod
    def from_source_config(cls, config: dict, num_layers: int) -> IndexCachePattern:
        """The layer types a checkpoint's config.json already carries, in transformers 5.23's order.

        `indexer_types`, else `index_topk_pattern` (a string or a list of types), else the uniform schedule of
        `index_topk_freq` / `index_skip_topk_offset` (default offset 2); a config with none of them is all-F.
        """
        if config.get("indexer_types"):
            return cls.from_indexer_types(list(config["indexer_types"])[:num_layers])
        pattern = config.get("index_topk_pattern")
        if pattern is not None:
            if isinstance(pattern, str):
                return cls.parse(pattern[:num_layers], num_layers)
            return cls.from_indexer_types(list(pattern)[:num_layers])
        if "index_topk_freq" in config:
            freq = max(int(config["index_topk_freq"]), 1)
            return cls.uniform(num_layers, freq, int(config.get("index_skip_topk_offset", 2)))
        return cls.all_full(num_layers)

    # ---- views ----------------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.value

    def __len__(self) -> int:
        return len(self.value)

    @property
    def num_layers(self) -> int:
        return len(self.value)

    def is_full(self, layer: int) -> bool:
        return self.value[layer] == FULL

    @cached_property
    def full_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.value) if c == FULL]

    @cached_property
    def shared_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.value) if c == SHARED]

    @property
    def retention(self) -> float:
        """Fraction of layers that keep an indexer."""
        return len(self.full_layers) / self.num_layers

    @cached_property
    def groups(self) -> dict[int, list[int]]:
        """F layer -> the layers it serves (itself first, then its S layers in order)."""
        out: dict[int, list[int]] = {}
        owner = 0
        for i, c in enumerate(self.value):
            if c == FULL:
                owner = i
                out[owner] = []
            out[owner].append(i)
        return out

    def owner(self, layer: int) -> int:
        """The F layer whose top-k `layer` uses (itself when it is F)."""
        if not 0 <= layer < self.num_layers:
            # A negative index would otherwise count from the end and name the wrong owner.
            raise IndexError(f"layer {layer} is outside the pattern's {self.num_layers} layers")
        for i in range(layer, -1, -1):
            if self.value[i] == FULL:
                return i
        raise AssertionError("unreachable: layer 0 is always F")

    def to_indexer_types(self) -> list[str]:
        return [_TYPE_OF[c] for c in self.value]

    def uniform_params(self, max_freq: int | None = None, max_offset: int | None = None) -> tuple[int, int] | None:
        """(freq, offset) that reproduces this pattern with the engines' formula, or None.

        The smallest freq wins, and offset 2 (the engines' default) is preferred among equals.
        """
        n = self.num_layers
        freqs = range(1, (max_freq or n) + 1)
        offsets = [2, *[o for o in range(1, (max_offset or n) + 1) if o != 2]]
        for freq in freqs:
            for offset in offsets:
                if IndexCachePattern.uniform(n, freq, offset).value == self.value:
                    return freq, offset
        return None
