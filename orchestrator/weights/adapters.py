"""Many LoRA adapters of one base GPT in one batch: PEFT adapter directories read as data, and
adapter slots in every adapted linear layer, so that each row of a continuous batch can use its
own adapter (or none) in the same forward.

After Punica and S-LoRA (vLLM's multi-LoRA): the base weights are loaded once; every adapted
`nn.Linear` becomes a `SlottedLinear` that holds `slots` stacked low-rank factors (slot 0 is all
zeros: no adapter) and adds, for each row, `x @ A[slot].T @ B[slot].T` by a gathered batched
matmul. Which slot each row uses is set per forward (`AdapterPool.rows`), per thread, so a health
check decoding on another thread sees the plain base.

An adapter directory is what `orchestrator export RUN --format peft` writes (and what peft's
`save_pretrained` writes): adapter_config.json and adapter_model.safetensors. Only safetensors is
read (a `.bin` adapter is a pickle, which could run code); the keys are GPT2LMHeadModel's, and
the low-rank factors apply to the layer's input whatever the base weight's layout, so they carry
over to our GPT unchanged (scaled by lora_alpha / r, or / sqrt(r) with rslora).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from orchestrator.models import GPT, build_model
from orchestrator.models.hf import gpt2_module_name
from orchestrator.spec import JobSpec, Task
from orchestrator.storage import Location, resolve
from orchestrator.weights.base import load_base_weights
from orchestrator.weights.model import Bundle, load_bundle

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUR_MODULES = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
_OURS = {gpt2_module_name(name): name for name in OUR_MODULES}  # attn.c_attn -> attn.qkv
_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(.+)\.lora_([AB])\.weight")


class AdapterError(ValueError):
    """An adapter directory that cannot be served on this base; the message names it and why."""


class NoFreeSlot(RuntimeError):
    """Every slot holds an adapter that a running row uses: the request waits for one."""


@dataclass(frozen=True)
class AdapterConfig:
    """What adapter_config.json says, checked: enough to size the slots without the weights."""

    name: str
    path: str
    base: str | None  # base_model_name_or_path: the checkpoint the adapter was trained on
    rank: int
    scaling: float
    modules: tuple[str, ...]  # our module names in every block: attn.qkv, ...


@dataclass
class LoraWeights:
    """One adapter's factors by our module name (`blocks.0.attn.qkv`): A (r, in) and B (out, r)
    with the scaling folded in."""

    config: AdapterConfig
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.factors.values())


def read_config(name: str, path: str) -> AdapterConfig:
    """adapter_config.json of the adapter `name` at `path` (local or in object storage)."""
    folder = resolve(path)
    where = f"serve.adapters.{name} = {path!r}"
    if not folder.join(ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{where}: no {ADAPTER_CONFIG} there; an adapter is a PEFT adapter "
                           "directory (orchestrator export RUN --format peft)")
    if not folder.join(ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{where}: no {ADAPTER_WEIGHTS} there (a pickled adapter_model.bin "
                           "is never loaded: save it with safe_serialization)")
    raw = json.loads(folder.join(ADAPTER_CONFIG).read_text())
    problems = []
    if raw.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {raw.get('peft_type')!r} (served: LORA)")
    for flag in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if raw.get(flag):
            problems.append(f"{flag} {raw[flag]!r} (not served)")
    if raw.get("bias", "none") != "none":
        problems.append(f"bias {raw['bias']!r} (served: none)")
    targets = raw.get("target_modules") or []
    modules = sorted({ours for theirs, ours in _OURS.items() if _targeted(theirs, targets)})
    if not modules:
        problems.append(f"target_modules {targets} (a GPT-2 adapter targets some of "
                        f"{', '.join(m.split('.')[-1] for m in _OURS)})")
    if problems:
        raise AdapterError(f"{where}: {'; '.join(problems)}")
    rank, alpha = int(raw["r"]), float(raw.get("lora_alpha", raw["r"]))
    scaling = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank
    return AdapterConfig(name, path, raw.get("base_model_name_or_path"), rank, scaling,
                         tuple(modules))


def check_adapters(spec: JobSpec) -> list[AdapterConfig]:
    """serve.adapters checked before anything is served: a GPT language model fine-tuned from
    a pretrained checkpoint, adapter names apart from the model's, and each adapter a PEFT LoRA
    directory trained on that checkpoint (its base_model_name_or_path)."""
    adapters = spec.serve.adapters
    if not adapters:
        return []
    if spec.model.task != Task.LANGUAGE_MODEL or spec.model.pretrained is None:
        raise AdapterError(f"serve.adapters = {sorted(adapters)}: adapters are served on the "
                           "pretrained checkpoint of a language model (model.pretrained); this "
                           f"run is a {spec.model.task} with model.pretrained "
                           f"{spec.model.pretrained!r}")
    if spec.name in adapters:
        raise AdapterError(f"serve.adapters.{spec.name}: an adapter cannot have the model's own "
                           "name (`name`), which requests use for the base")
    configs = [read_config(name, path) for name, path in adapters.items()]
    for config in configs:
        if config.base is not None and resolve(config.base).uri != resolve(spec.model.pretrained).uri:
            raise AdapterError(f"serve.adapters.{config.name} = {config.path!r} was trained on "
                               f"{config.base!r} (its base_model_name_or_path), but this run's "
                               f"model.pretrained is {spec.model.pretrained!r}")
    return configs


def base_bundle(bundle_dir: str | Location) -> Bundle:
    """A run's winner bundle with its model replaced by the run's pretrained checkpoint as the
    run directory staged it (RUN/base), unmerged: what the adapters apply to. Its version is
    the base weights' (the first 12 hex digits of their SHA-256)."""
    bundle = resolve(bundle_dir)
    run, _, leaf = bundle.uri.rstrip("/").rpartition("/")
    if leaf != "winner":
        raise AdapterError(f"serve.adapters: {bundle.uri} is not a run's winner/; adapters are "
                           "served on the run's staged base checkpoint: deploy the run directory "
                           "(or its winner/)")
    loaded = load_bundle(bundle)
    if loaded.spec.model.pretrained is None or not isinstance(loaded.model, GPT):
        raise AdapterError(f"serve.adapters: {bundle.uri} is not a GPT fine-tuned from a "
                           "pretrained checkpoint (model.pretrained), which adapters apply to")
    base = resolve(run).join("base")
    model = build_model(loaded.spec, loaded.info)
    load_base_weights(model, base, loaded.info.labels)
    weights = base.join("model.safetensors")
    version = (hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file()
               else loaded.version)
    return replace(loaded, model=model.eval(), version=version)


def _targeted(module: str, targets: str | list[str]) -> bool:
    """Whether peft's target_modules names this GPT-2 block module: a string is a regex of the
    whole module name, a list holds names or name suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, f"transformer.h.0.{module}") is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def read_weights(config: AdapterConfig) -> LoraWeights:
    """The adapter's factors from its safetensors file (data only), under our module names."""
    from safetensors.torch import load

    raw = load(resolve(config.path).join(ADAPTER_WEIGHTS).read_bytes())
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        match = _KEY.fullmatch(key)
        if match is None or match[2] not in _OURS:
            raise AdapterError(f"serve.adapters.{config.name} = {config.path!r}: weight {key!r} "
                               "is not a LoRA factor of a GPT-2 block's linear layer")
        halves.setdefault(f"blocks.{match[1]}.{_OURS[match[2]]}", {})[match[3]] = value.float()
    factors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"serve.adapters.{config.name}: {module} has lora_"
                               f"{''.join(pair)} without its other factor")
        factors[module] = (pair["A"], pair["B"] * config.scaling)
    return LoraWeights(config, factors)


class SlottedLinear(nn.Module):
    """A base linear layer plus one low-rank adapter per slot; each row adds its own slot's."""

    def __init__(self, base: nn.Linear, slots: int, rank: int, pool: AdapterPool):
        super().__init__()
        self.base, self.pool = base, pool
        weight = base.weight
        self.register_buffer("lora_A", weight.new_zeros(slots, rank, base.in_features),
                             persistent=False)
        self.register_buffer("lora_B", weight.new_zeros(slots, base.out_features, rank),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rows = self.pool.current_rows()
        if rows is None:  # no row uses an adapter: the base alone, at its own cost
            return out
        a = self.lora_A.index_select(0, rows).transpose(1, 2)  # (batch, in, r)
        b = self.lora_B.index_select(0, rows).transpose(1, 2)  # (batch, r, out)
        return out + torch.bmm(torch.bmm(x, a), b)

    def put(self, slot: int, factors: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Fill a slot with an adapter's factors (zero-padded to the slots' rank), or clear it."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if factors is not None:
            a, b = factors
            self.lora_A[slot, :a.shape[0]] = a.to(self.lora_A)
            self.lora_B[slot, :, :b.shape[1]] = b.to(self.lora_B)


class AdapterPool:
    """The adapters one base model serves: their configs (read and checked up front), at most
    `max_adapters` of them loaded into slots on demand, the least recently used one that no
    running row uses evicted for a new one. Slot 0 is the base (no adapter)."""

    def __init__(self, model: GPT, adapters: Mapping[str, str], max_adapters: int):
        if not isinstance(model, GPT):
            raise AdapterError(f"LoRA adapters are served on a GPT, not {type(model).__name__}")
        self.configs = {name: read_config(name, path) for name, path in adapters.items()}
        self.max_adapters = max_adapters
        self._loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, oldest use first
        self._thread = threading.local()
        self.loads = 0  # adapters read from storage so far (evictions make it grow)
        rank = max((c.rank for c in self.configs.values()), default=1)
        modules = sorted({m for c in self.configs.values() for m in c.modules})
        self.layers: dict[str, SlottedLinear] = {}
        for index, block in enumerate(model.blocks):
            for module in modules:
                parent_name, _, child = module.rpartition(".")
                parent = block.get_submodule(parent_name)
                layer = SlottedLinear(getattr(parent, child), max_adapters + 1, rank, self)
                setattr(parent, child, layer)
                self.layers[f"blocks.{index}.{module}"] = layer
        self.slot_bytes = sum(layer.lora_A[0].nbytes + layer.lora_B[0].nbytes
                              for layer in self.layers.values())

    @property
    def names(self) -> list[str]:
        return sorted(self.configs)

    @property
    def loaded(self) -> list[str]:
        """The adapters in slots now, least recently used first."""
        return list(self._loaded)

    def slot(self, name: str | None, busy: set[int]) -> int:
        """The slot that holds adapter `name` (0: none), loading it first if it is not loaded,
        into a free slot or the least recently used one whose slot is not in `busy` (the slots
        running rows use). NoFreeSlot when every slot is busy; AdapterError for an adapter that
        cannot be loaded."""
        if name is None:
            return 0
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        free = set(range(1, self.max_adapters + 1)) - set(self._loaded.values())
        victim = None
        if not free:  # found before reading anything: a request that waits reads nothing
            victim = next((n for n, s in self._loaded.items() if s not in busy), None)
            if victim is None:
                raise NoFreeSlot(f"all {self.max_adapters} adapter slots are in use")
        weights = read_weights(self.configs[name])
        slot = min(free) if free else self._loaded.pop(victim)
        self._fill(slot, weights)
        self._loaded[name] = slot
        self.loads += 1
        return slot

    def _fill(self, slot: int, weights: LoraWeights) -> None:
        unknown = set(weights.factors) - set(self.layers)
        if unknown:
            raise AdapterError(f"serve.adapters.{weights.config.name}: {min(unknown)} is "
                               "not a linear layer of this base")
        for module, layer in self.layers.items():
            factors = weights.factors.get(module)
            if factors is not None:
                a, b = factors
                if a.shape[1] != layer.base.in_features or b.shape[0] != layer.base.out_features:
                    raise AdapterError(
                        f"serve.adapters.{weights.config.name}: {module} factors of shapes "
                        f"{tuple(a.shape)} and {tuple(b.shape)} do not fit the base's "
                        f"{layer.base.in_features} -> {layer.base.out_features} layer")
        for module, layer in self.layers.items():
            layer.put(slot, weights.factors.get(module))

    # ---- which slot each row of the next forward uses (per thread) ---------------------------

    def current_rows(self) -> torch.Tensor | None:
        return getattr(self._thread, "rows", None)

    @contextmanager
    def rows(self, slots: list[int], device: torch.device) -> Iterator[None]:
        """Forwards in this block (on this thread) apply slot slots[i] to row i."""
        self._thread.rows = (torch.tensor(slots, device=device) if any(slots) else None)
        try:
            yield
        finally:
            self._thread.rows = None
