"""Which model parameter a checkpoint key fills: transformers' renamings, base_model_prefix added or stripped, peft
wrappers looked through, tied weights filled once; and what is still unfilled (on the meta device) afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from shardtune.errors import ModelError

def _unwrap(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weight_renamings(base: nn.Module):
    """transformers' checkpoint-key renamings for this model, and its converters (which streaming cannot apply).
    Older transformers without this machinery, or with another interface, rename nothing (checkpoint keys are the
    module names, as for llama / mistral / qwen2)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        mapping = get_model_conversion_mapping(base)
    except (ImportError, TypeError, AttributeError):
        return [], []
    ren = [m for m in mapping if isinstance(m, WeightRenaming) and hasattr(m, "rename_source_key")]
    conv = [m for m in mapping if isinstance(m, WeightConverter) and hasattr(m, "rename_source_key")]
    return ren, conv


@dataclass
class Target:
    """One parameter (or buffer) object of the model that a checkpoint tensor fills, and every module holding it."""

    name: str
    holders: list[tuple[nn.Module, str]]
    kind: str  # "4bit" | "int8" | "plain"
    is_buffer: bool = False
    transpose: bool = False  # GPT-2 Conv1D weights are stored [in, out]

    @property
    def module(self) -> nn.Module:
        return self.holders[0][0]

    @property
    def attr(self) -> str:
        return self.holders[0][1]

    @property
    def current(self) -> torch.Tensor:
        m, a = self.holders[0]
        return m._buffers[a] if self.is_buffer else m._parameters[a]


class CheckpointNames:
    """Maps checkpoint keys to the model's parameters: transformers' renamings, base_model_prefix added or stripped,
    peft wrappers (LoRA base_layer, modules_to_save) looked through, tied weights filled once."""

    def __init__(self, model: nn.Module):
        import bitsandbytes as bnb
        self.base = _unwrap(model)
        self.prefix = getattr(self.base, "base_model_prefix", "") or ""
        self.renamings, self.converters = _weight_renamings(self.base)
        self._holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
        self._objects: dict[int, torch.Tensor] = {}  # keeps the original tensors alive so their ids stay unique
        for mname, module in self.base.named_modules(remove_duplicate=False):
            for store, is_buf in ((module._parameters, False), (module._buffers, True)):
                for a, t in store.items():
                    if t is None:
                        continue
                    full = f"{mname}.{a}" if mname else a
                    self._holders.setdefault(id(t), []).append((module, a, full))
                    self._objects[id(t)] = t
        self._bnb4, self._bnb8 = bnb.nn.Linear4bit, bnb.nn.Linear8bitLt
        self.filled: set[int] = set()
        # peft ModulesToSaveWrapper: its trainable copies start as the original's weights. For a tied head the
        # original shares the embedding's tensor, so the copies must be filled from the embedding's key too.
        self._mts = [m for m in self.base.modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")]

    def _module(self, path: str) -> Optional[nn.Module]:
        try:
            return self.base.get_submodule(path) if path else self.base
        except AttributeError:
            return None

    def _candidates(self, key: str) -> list[str]:
        for r in self.renamings:
            key, _ = r.rename_source_key(key)
        for c in self.converters:
            if c.rename_source_key(key)[1] is not None:
                raise ModelError(f"checkpoint tensor '{key}' needs a weight conversion ({type(c).__name__}) that "
                                 f"streamed loading does not apply for model type "
                                 f"'{getattr(self.base.config, 'model_type', '?')}'; use parallel.strategy=none or ddp "
                                 "(from_pretrained) for this architecture")
        out = [key]
        p = self.prefix
        if p:
            out += [key[len(p) + 1:]] if key.startswith(p + ".") else [f"{p}.{key}"]
        return out

    def _resolve_one(self, name: str) -> list[tuple[nn.Module, str, bool, str]]:
        path, _, attr = name.rpartition(".")
        module = self._module(path)
        if module is None:
            return []
        mods = [module]
        while hasattr(mods[0], "base_layer") and not isinstance(mods[0], (self._bnb4, self._bnb8)):
            mods = [mods[0].base_layer]  # peft LoRA wrapper
        if hasattr(mods[0], "original_module") and hasattr(mods[0], "modules_to_save"):  # peft ModulesToSaveWrapper
            mods = [mods[0].original_module] + list(mods[0].modules_to_save.values())
        found = []
        for m in mods:
            if m._parameters.get(attr) is not None:
                found.append((m, attr, False, name))
            elif m._buffers.get(attr) is not None:
                found.append((m, attr, True, name))
        return found

    def targets(self, key: str) -> list[Target]:
        """The parameters `key` fills (empty when the model has no such weight, or it was already filled: tied)."""
        for cand in self._candidates(key):
            found = self._resolve_one(cand)
            if found:
                break
        else:
            return []
        out: list[Target] = []
        for m, attr, is_buf, name in found:
            t = m._buffers[attr] if is_buf else m._parameters[attr]
            if id(t) in self.filled:
                continue
            self.filled.add(id(t))
            holders = [(m, attr)] + [(hm, ha) for hm, ha, _ in self._holders.get(id(t), [])
                                     if not (hm is m and ha == attr)]
            kind = "plain"
            if attr == "weight" and isinstance(m, self._bnb4):
                kind = "4bit"
            elif attr == "weight" and isinstance(m, self._bnb8):
                kind = "int8"
            conv1d = getattr(getattr(m, "source_cls", None), "__name__", "") == "Conv1D"
            out.append(Target(name, holders, kind, is_buf, transpose=kind != "plain" and conv1d))
            out += self._copies_of(holders, attr, is_buf)
        return out

    def _copies_of(self, holders, attr: str, is_buf: bool) -> list[Target]:
        """modules_to_save copies of any holder that is a wrapper's original module, not filled yet."""
        extra = []
        for w in self._mts:
            if not any(hm is w.original_module for hm, _ in holders):
                continue
            for copy in w.modules_to_save.values():
                t = copy._buffers.get(attr) if is_buf else copy._parameters.get(attr)
                if t is None or id(t) in self.filled:
                    continue
                self.filled.add(id(t))
                full = self._holders.get(id(t), [(None, None, attr)])[0][2]
                extra.append(Target(full, [(copy, attr)], "plain", is_buf))
        return extra

    def unfilled(self) -> list[str]:
        """Names of parameters / persistent buffers still on the meta device (missing from the checkpoint)."""
        names = []
        for tid, hs in self._holders.items():
            m, a, full = hs[0]
            t = m._parameters.get(a) if a in m._parameters else m._buffers.get(a)
            if t is not None and _is_meta(t) and tid not in self.filled:
                names.append(full)
        return names


def _is_meta(t: torch.Tensor) -> bool:
    local = getattr(t, "_local_tensor", None)
    return (local if local is not None else t).is_meta

