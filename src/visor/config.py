"""VISOR's layer schedule as configuration data, validated once, and the `Schedule` one forward pass runs.

`VisorConfigMixin` adds VISOR's fields to a family's own config class (each backbone adapter defines
`class VisorConfig(VisorConfigMixin, <the family's config>)`), so a VISOR checkpoint's config is the stock one plus
the layer schedule (CA layers, SA candidates, the feasible configurations from fewest SA layers to most, where the
router decides), the new modules' options and the router's state (mode, τ, the novelty guard's shape and κ: the
config is their one owner). `Schedule` is the layer kinds one sample runs, what the FLOP counter prices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Literal

UNTRAINED_ROUTER = ('configuration="auto" needs a trained router, and this model\'s router was never trained (its '
                    "choices would be random): train it with `visor policy label` and `visor policy train`, or pass "
                    "a configuration index")

ROUTER_MODES = ("softmax", "multilabel")
CROSS_ATTENTION_INITS = ("zero", "host")


def default_schedule(num_layers: int) -> tuple[list[int], list[int]]:
    """L/3 CA layers at the start of each stride and L/3 SA candidates right after them (disjoint).

    Each SA candidate follows a CA layer, so text has read the image before the router (placed before the
    first candidate) decides, and every SA layer's refined visual tokens reach the next CA layer.
    """
    if num_layers < 2:
        raise ValueError(f"VISOR needs a text model with at least 2 layers, got {num_layers}")
    count = max(1, num_layers // 3)
    cross = [int(i * num_layers / count) for i in range(count)]
    self_attention = [layer + 1 for layer in cross if layer + 1 < num_layers and layer + 1 not in cross]
    return cross, self_attention


@dataclass(kw_only=True)
class VisorConfigMixin:
    """For a sample that runs configuration `c`, layer `l` is SA if `l` is in `configurations[c]`, has a CA block
    in front if it is in `cross_attention_layers`, and runs on text only otherwise. Build one with
    `from_stock_config(...)`; `dense(...)` is the configuration that equals the stock model."""

    cross_attention_layers: list[int] | None = None
    self_attention_layers: list[int] | None = None
    configurations: list[list[int]] | None = None
    router_layer: int | None = None
    allow_cross_and_self_attention: bool = False
    # The CA blocks (`visor.modeling.cross_attention`).
    cross_attention_init: Literal["zero", "host"] = "zero"
    cross_attention_gate: bool = True
    cross_attention_mlp: bool = False
    cross_attention_rope: bool = True
    cross_attention_key_value_heads: int | None = None  # None: the host layer's; fewer make CA cheaper
    # The policy's router (`visor.modeling.router`), built when there is more than one configuration.
    router_hidden_size: int = 256
    router_mode: Literal["softmax", "multilabel"] = "softmax"
    router_threshold: float = 0.5
    # What the router was trained on (`visor.policy.training` records it); None: never trained, so its decisions
    # are random and `configuration="auto"` is refused.
    router_training: dict | None = None
    # τ's guarantee when it was certified for a maximum loss and confidence (`visor.policy.guarantee`); None: τ was
    # set some other way (a FLOPs or accuracy target, or by hand) and promises nothing.
    router_guarantee: dict | None = None
    # Its novelty guard (`visor.modeling.novelty`): how many training features it keeps (0: no guard), how many
    # neighbours it compares with, and its threshold κ (None: flags nothing).
    router_novelty_references: int = 0
    router_novelty_neighbours: int = 5
    router_novelty_threshold: float | None = None
    # Conditional position encoding on visual tokens after the projector (`visor.modeling.position_encoding`).
    position_encoding: bool = True
    position_encoding_kernel: int = 7

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.cross_attention_layers is None or self.self_attention_layers is None:
            default_cross, default_self = default_schedule(self.num_layers)
            if self.cross_attention_layers is None:
                self.cross_attention_layers = default_cross
            if self.self_attention_layers is None:
                self.self_attention_layers = [layer for layer in default_self if layer not in self.cross_attention_layers]
        self.cross_attention_layers = sorted(int(layer) for layer in self.cross_attention_layers)
        self.self_attention_layers = [int(layer) for layer in self.self_attention_layers]
        if self.configurations is None:
            candidates = self.self_attention_layers
            self.configurations = [candidates[:count] for count in range(len(candidates) + 1)]
        self.configurations = [sorted(int(layer) for layer in config) for config in self.configurations]
        if not self.configurations:
            raise ValueError("configurations is empty: give at least one set of self-attention layers")
        if self.router_layer is None:
            self.router_layer = self.first_optional_layer
        self.validate_schedule()

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_stock_config(cls, stock_config, cross_attention_layers: list[int] | None = None,
                          self_attention_layers: list[int] | None = None,
                          configurations: list[list[int]] | None = None, **options):
        """Wrap the family's stock config; unspecified layer lists get the evenly spread L/3 defaults."""
        for name in options:
            if name not in VISOR_OPTIONS:
                close = get_close_matches(name, [field.name for field in fields(VisorConfigMixin)], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; the options are {sorted(VISOR_OPTIONS)}"
                raise ValueError(f"unknown VISOR option {name!r}{hint}")
        base = stock_config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            base.pop(key, None)
        return cls(**base, cross_attention_layers=cross_attention_layers, self_attention_layers=self_attention_layers,
                   configurations=configurations, **options)

    @classmethod
    def dense(cls, stock_config, **options):
        """Every layer SA and no CA block: the configuration that must equal the stock model."""
        every_layer = list(range(stock_config.text_config.num_hidden_layers))
        return cls.from_stock_config(stock_config, cross_attention_layers=[], self_attention_layers=every_layer,
                                     configurations=[every_layer], **options)

    # ----------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def first_optional_layer(self) -> int | None:
        """The first SA candidate that some configuration leaves out (None if every configuration is equal)."""
        always = set.intersection(*(set(config) for config in self.configurations))
        optional = sorted(set(self.self_attention_layers) - always)
        return optional[0] if optional else None

    @property
    def largest_configuration(self) -> int:
        """Index of the configuration with the most SA layers: the last (configurations go from fewest to most)."""
        return len(self.configurations) - 1

    def validate_schedule(self) -> None:
        """Raise a ValueError naming the first problem in the layer schedule."""
        num_layers = self.num_layers
        for name, layers in (("cross_attention_layers", self.cross_attention_layers),
                             ("self_attention_layers", self.self_attention_layers)):
            bad = [layer for layer in layers if not 0 <= layer < num_layers]
            if bad:
                raise ValueError(f"{name} {bad} out of range: the text model has layers 0..{num_layers - 1}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name} has duplicates: {layers}")
        overlap = sorted(set(self.cross_attention_layers) & set(self.self_attention_layers))
        if overlap and not self.allow_cross_and_self_attention:
            raise ValueError(
                f"layers {overlap} are both cross-attention and self-attention candidates; "
                "set allow_cross_and_self_attention=True if that is intended"
            )
        if not self.configurations:
            raise ValueError("configurations is empty: give at least one set of self-attention layers")
        candidates = set(self.self_attention_layers)
        for index, config in enumerate(self.configurations):
            if len(set(config)) != len(config):
                raise ValueError(f"configuration {index} has duplicate layers: {config}")
            outside = sorted(set(config) - candidates)
            if outside:
                raise ValueError(
                    f"configuration {index} uses layers {outside} that are not self_attention_layers "
                    f"{self.self_attention_layers}"
                )
            if self.configurations.index(config) != index:
                raise ValueError(f"configuration {index} repeats configuration {self.configurations.index(config)}: "
                                 f"{config}")
        sizes = [len(config) for config in self.configurations]
        if sizes != sorted(sizes):
            raise ValueError(f"configurations must go from fewest to most self-attention layers (the last is the "
                             f"largest), got sizes {sizes}")
        first_optional = self.first_optional_layer
        if self.router_layer is not None:
            if not 0 <= self.router_layer < num_layers:
                raise ValueError(f"router_layer {self.router_layer} out of range 0..{num_layers - 1}")
            if first_optional is not None and self.router_layer > first_optional:
                raise ValueError(
                    f"router_layer {self.router_layer} comes after the first optional self-attention layer "
                    f"{first_optional}: the router must decide before any optional layer runs"
                )
        if self.cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(f"cross_attention_init must be one of {CROSS_ATTENTION_INITS}, got "
                             f"{self.cross_attention_init!r}")
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"router mode must be one of {ROUTER_MODES}, got {self.router_mode!r}")
        if not 0.0 <= self.router_threshold <= 1.0:
            raise ValueError(f"router_threshold τ must lie in [0, 1], got {self.router_threshold}")
        if self.router_novelty_references < 0 or self.router_novelty_neighbours < 1:
            raise ValueError(f"router_novelty_references must be >= 0 and router_novelty_neighbours >= 1, got "
                             f"{self.router_novelty_references} and {self.router_novelty_neighbours}")
        if self.router_hidden_size < 1:
            raise ValueError(f"router_hidden_size must be positive, got {self.router_hidden_size}")
        host_heads = self.text_config.num_key_value_heads or self.text_config.num_attention_heads
        heads = self.cross_attention_key_value_heads
        if heads is not None and (heads < 1 or host_heads % heads):
            raise ValueError(f"cross_attention_key_value_heads must be a positive divisor of the text model's "
                             f"{host_heads} key/value heads, got {heads}")
        if self.position_encoding_kernel < 1 or self.position_encoding_kernel % 2 == 0:
            raise ValueError(f"position_encoding_kernel must be a positive odd number, got {self.position_encoding_kernel}")

    def forget_router_training(self) -> None:
        """The router's training and τ's guarantee no longer hold (the weights it reads changed, or the router)."""
        self.router_training = None
        self.router_guarantee = None

    @property
    def has_router(self) -> bool:
        """Whether models of this config have a router: several configurations and a layer to route at."""
        return len(self.configurations) > 1 and self.router_layer is not None

    def check_choice(self, configuration, router_trained: bool) -> int | str:
        """A request for one configuration for a whole batch, as a model of this config runs it: an index (None:
        the largest) or "auto" (the router chooses, which needs a router, trained: `router_trained`). Every entry
        point (forward and generate, `visor generate` and the lmms-eval runner, the vLLM plugin) checks its request
        here; a ValueError names the problem."""
        if isinstance(configuration, str):
            if configuration != "auto":
                raise ValueError(f'configuration must be an index, one index per sample, or "auto"; '
                                 f"got {configuration!r}")
            if not self.has_router:
                raise ValueError('configuration="auto" needs a router: this model has a single configuration')
            if not router_trained:
                raise ValueError(UNTRAINED_ROUTER)
            return configuration
        return self.largest_configuration if configuration is None else self.check_configuration(configuration)

    def check_configuration(self, index) -> int:
        """`index` as a configuration index of this config; a ValueError naming the valid ones otherwise."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.configurations):
            raise ValueError(f"configuration {index!r} does not exist: this model has configurations "
                             f"0..{len(self.configurations) - 1}")
        return index


VISOR_OPTIONS = frozenset(field.name for field in fields(VisorConfigMixin)) - {
    "cross_attention_layers", "self_attention_layers", "configurations"}  # `from_stock_config`'s keyword options


@dataclass(frozen=True)
class Schedule:
    """The layer kinds one sample runs through the language model (what the FLOP counter prices)."""

    self_attention: frozenset[int]  # layers over [visual; text]
    cross_attention: frozenset[int] = frozenset()  # layers with a CA block in front
    position_encoding: bool = False  # the CPE runs on the visual tokens
    visual: bool = True  # False: no visual token reaches the language model

    @classmethod
    def full(cls, config) -> Schedule:
        """The stock model: every layer SA, no CA block, no CPE."""
        return cls(frozenset(range(config.text_config.num_hidden_layers)))

    @classmethod
    def text_only(cls) -> Schedule:
        """The floor: the question without its image."""
        return cls(frozenset(), visual=False)

    @classmethod
    def of(cls, config: VisorConfigMixin, configuration: int) -> Schedule:
        """VISOR's configuration `configuration` of `config`."""
        return cls.with_layers(config, config.configurations[config.check_configuration(configuration)])

    @classmethod
    def with_layers(cls, config: VisorConfigMixin, self_attention_layers) -> Schedule:
        """VISOR with `config`'s CA layers and CPE, running `self_attention_layers` as SA."""
        return cls(frozenset(self_attention_layers), frozenset(config.cross_attention_layers), config.position_encoding)
