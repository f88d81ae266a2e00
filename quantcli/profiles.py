"""YAML layer profiles: a base preset plus ordered rules that pick a type per tensor and layer.

    # profiles/attention-high-precision.yaml
    base: Q4_K_M                 # a llama.cpp preset or a type: everything no rule matches
    rules:                       # first match wins
      - name: "blk.*.attn_v.weight"   # a glob on the tensor name ...
        type: Q6_K
      - regex: "attn_(q|k|output)"    # ... or a regular expression (re.search)
        layers: "first 1/8"           # all | 3 | [0, 1, "4-7"] | "first 4" | "last 25%" | "first 1/8"
        type: Q5_K
        fallback: true                # if the type's block does not divide a row, use llama.cpp's fallback
    keep:                        # tensors kept as they are in the source (high precision)
      - "token_embd.weight"
    keep_type: F16               # optional: store kept tensors as this type instead of unchanged
    allocation:                  # written by quantize --save-profile: recorded as quantcli.allocation.*
      target: size 180MB         # (the automatic mix's target, estimate, measurement, per-tensor
      estimate_kld: 0.0123       #  estimates in file order), so the profile's file equals the mix's
      measurement_sha256: 9f...
      tensor_kld: [0.0, 1.2e-05, ...]

Errors name the file and line and say how to fix it. YAML anchors/aliases are refused (no billion-laughs).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantcli.errors import UsageError
from quantcli.inputs import read_small_text
from quantcli.names import layer_of

MAX_PROFILE_BYTES = 1 << 20
TOP_KEYS = {"base", "description", "rules", "keep", "keep_type", "allocation"}
ALLOCATION_KEYS = ("target", "estimate_kld", "measurement_sha256", "tensor_kld")
RULE_KEYS = {"name", "regex", "layers", "type", "fallback", "note"}


class ProfileError(UsageError):
    """A mistake in a profile file: message starts with `path:line:`."""


@dataclass(frozen=True)
class LayerSel:
    """Which layer indices a rule covers, resolved against the model's layer count."""

    spec: Any
    line: int

    def resolve(self, n_layers: int, where: str) -> set[int]:
        items = self.spec if isinstance(self.spec, list) else [self.spec]
        out: set[int] = set()
        for item in items:
            out |= _one_selection(item, n_layers, where)
        return out


def _count(text: str, n_layers: int, where: str) -> int:
    text = text.strip()
    try:
        if text.endswith("%"):
            return max(1, round(n_layers * float(text[:-1]) / 100))
        if "/" in text:
            num, den = text.split("/")
            return max(1, round(n_layers * int(num) / int(den)))
        return int(text)
    except (ValueError, ZeroDivisionError):
        raise ProfileError(f"{where}: layer count '{text}' is not N, N%, or a fraction like 1/8") from None


def _one_selection(item: Any, n_layers: int, where: str) -> set[int]:
    if isinstance(item, bool):
        raise ProfileError(f"{where}: layers entry {item!r} is not a layer selection")
    if isinstance(item, int):
        if not 0 <= item < n_layers:
            raise ProfileError(f"{where}: layer {item} does not exist (the model has {n_layers})")
        return {item}
    if not isinstance(item, str):
        raise ProfileError(f"{where}: layers entry {item!r} is not a layer selection",
                           hint="use all, an index, a range '0-3', 'first 4', 'last 25%' or 'first 1/8'")
    text = item.strip().lower()
    if text == "all":
        return set(range(n_layers))
    m = re.fullmatch(r"(first|last)\s+(.+)", text)
    if m:
        k = min(_count(m.group(2), n_layers, where), n_layers)
        return set(range(k)) if m.group(1) == "first" else set(range(n_layers - k, n_layers))
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if a > b or b >= n_layers:
            raise ProfileError(f"{where}: layer range {item} is outside 0-{n_layers - 1}")
        return set(range(a, b + 1))
    if text.isdigit():
        return _one_selection(int(text), n_layers, where)
    raise ProfileError(f"{where}: cannot read layers '{item}'",
                       hint="use all, an index, a range '0-3', 'first 4', 'last 25%' or 'first 1/8'")


@dataclass(frozen=True)
class Rule:
    line: int
    index: int
    matcher: Callable[[str], bool]
    pattern: str
    layers: LayerSel | None
    type: str
    fallback: bool


@dataclass(frozen=True)
class Profile:
    path: Path
    base: str
    rules: tuple[Rule, ...]
    keep: tuple[str, ...]
    keep_type: str | None
    allocation: dict[str, Any] | None = None  # quantcli.allocation.* metadata (see the module)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"

    def apply(self, infos: list, choices: list, meta: Callable[[str], Any]) -> list:
        """The preset's choices with this profile's keep list and rules applied on top."""
        from quantcli.presets import TensorChoice

        arch = meta("general.architecture")
        layer_ids = [layer_of(i.name) for i in infos]
        n_layers = meta(f"{arch}.block_count") if arch else None
        if not isinstance(n_layers, int):
            n_layers = max((x for x in layer_ids if x is not None), default=-1) + 1
        resolved = [r.layers.resolve(n_layers, self.where(r.line)) if r.layers else None for r in self.rules]
        out = []
        for info, choice, layer in zip(infos, choices, layer_ids):
            new = choice
            if any(fnmatch.fnmatchcase(info.name, g) for g in self.keep):
                t = self.keep_type or info.dtype
                new = TensorChoice(info.name, t, f"profile {self.path.name}: keep", False)
            elif len(info.shape) >= 2:
                for rule, layers in zip(self.rules, resolved):
                    if not rule.matcher(info.name):
                        continue
                    if layers is not None and (layer is None or layer not in layers):
                        continue
                    new = self._choose(rule, info)
                    break
            out.append(new)
        return out

    def _choose(self, rule: Rule, info):
        from quantcli.presets import TensorChoice, fallback_type

        block = GGML_QUANT_SIZES[GGMLQuantizationType[rule.type]][0]
        cols = info.shape[-1]
        reason = f"profile {self.path.name}:{rule.line}: rule {rule.index + 1} ({rule.pattern})"
        if cols % block == 0:
            return TensorChoice(info.name, rule.type, reason, False)
        if not rule.fallback:
            raise ProfileError(
                f"{self.where(rule.line)}: type '{rule.type}' needs rows divisible by {block}, "
                f"tensor {info.name} has {cols}",
                hint="choose a type with a smaller block (Q5_0, Q8_0, IQ4_NL) or add 'fallback: true' "
                     "to the rule")
        fb, why = fallback_type(rule.type, cols)
        return TensorChoice(info.name, fb, f"{reason}; {why}", True)


class _NoAliasLoader(yaml.SafeLoader):
    pass


def _compose(text: str, path: Path) -> yaml.Node | None:
    for event in yaml.parse(text, Loader=_NoAliasLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ProfileError(f"{path}:{event.start_mark.line + 1}: YAML anchors and aliases are not "
                               "allowed in profiles", hint="write the values out")
    return yaml.compose(text, Loader=_NoAliasLoader)


def _value(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True) if node is not None else None


def _check_type(name: Any, where: str, allow_copy: bool = False) -> str:
    from quantcli import codecs

    if not isinstance(name, str):
        raise ProfileError(f"{where}: type {name!r} is not a type name")
    upper = name.upper()
    if allow_copy and upper == "COPY":
        return upper
    try:
        qtype = GGMLQuantizationType[upper]
        if not codecs.get_codec(qtype).can_quantize:
            raise KeyError(upper)
    except (KeyError, UsageError):
        raise ProfileError(f"{where}: unknown type '{name}'",
                           hint=f"use one of {codecs.base.quantizable_names()}") from None
    return upper


def load(path: Path) -> Profile:
    path = Path(path)
    text = read_small_text(path, "profile", ProfileError, MAX_PROFILE_BYTES)
    try:
        root = _compose(text, path)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ProfileError(f"{path}{line}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(root, yaml.MappingNode):
        raise ProfileError(f"{path}:1: a profile is a mapping with 'base' and 'rules'",
                           hint="see profiles/README.md")
    fields = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _) in fields.items():
        if key not in TOP_KEYS:
            raise ProfileError(f"{path}:{knode.start_mark.line + 1}: unknown key '{key}'",
                               hint=f"known keys: {', '.join(sorted(TOP_KEYS))}")
    if "base" not in fields:
        raise ProfileError(f"{path}:1: missing 'base' (a preset such as Q4_K_M or a type)")
    base_node = fields["base"][1]
    base = _value(base_node)
    from quantcli import presets

    try:
        base = presets.get_preset(str(base)).name
    except UsageError as exc:
        raise ProfileError(f"{path}:{base_node.start_mark.line + 1}: {exc.message}", exc.hint) from None

    rules = []
    if "rules" in fields:
        rules_node = fields["rules"][1]
        if not isinstance(rules_node, yaml.SequenceNode):
            raise ProfileError(f"{path}:{rules_node.start_mark.line + 1}: 'rules' must be a list")
        for i, node in enumerate(rules_node.value):
            rules.append(_rule(node, i, path))
    keep: list[str] = []
    if "keep" in fields:
        kv = _value(fields["keep"][1])
        if not isinstance(kv, list) or not all(isinstance(k, str) for k in kv):
            raise ProfileError(f"{path}:{fields['keep'][1].start_mark.line + 1}: 'keep' must be a list "
                               "of tensor-name globs")
        keep = kv
    keep_type = None
    if "keep_type" in fields:
        node = fields["keep_type"][1]
        keep_type = _check_type(_value(node), f"{path}:{node.start_mark.line + 1}")
    allocation = None
    if "allocation" in fields:
        allocation = _allocation(fields["allocation"][1], path)
    return Profile(path, base, tuple(rules), tuple(keep), keep_type, allocation)


def _allocation(node: yaml.Node, path: Path) -> dict[str, Any]:
    """The `allocation` block --save-profile writes, as the metadata values it records."""
    import numpy as np

    where = f"{path}:{node.start_mark.line + 1}"
    value = _value(node)
    if not isinstance(value, dict) or set(value) != set(ALLOCATION_KEYS):
        raise ProfileError(f"{where}: 'allocation' must have exactly {', '.join(ALLOCATION_KEYS)}",
                           hint="it is written by quantize --save-profile; remove it to use the rules alone")
    kld = value["tensor_kld"]
    if (not isinstance(kld, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in kld)
            or not isinstance(value["estimate_kld"], (int, float))):
        raise ProfileError(f"{where}: 'allocation' estimates must be numbers")
    return {"allocation.target": str(value["target"]), "allocation.estimate_kld": float(value["estimate_kld"]),
            "allocation.measurement_sha256": str(value["measurement_sha256"]),
            "allocation.tensor_kld": np.array(kld, np.float32)}


def _rule(node: yaml.Node, index: int, path: Path) -> Rule:
    line = node.start_mark.line + 1
    where = f"{path}:{line}"
    if not isinstance(node, yaml.MappingNode):
        raise ProfileError(f"{where}: rule {index + 1} must be a mapping with name/regex and type")
    spec = {}
    for k, v in node.value:
        if k.value not in RULE_KEYS:
            raise ProfileError(f"{path}:{k.start_mark.line + 1}: unknown rule key '{k.value}'",
                               hint=f"known rule keys: {', '.join(sorted(RULE_KEYS))}")
        spec[k.value] = (v, _value(v))
    if ("name" in spec) == ("regex" in spec):
        raise ProfileError(f"{where}: rule {index + 1} needs exactly one of 'name' (glob) or 'regex'")
    if "type" not in spec:
        raise ProfileError(f"{where}: rule {index + 1} has no 'type'")
    type_name = _check_type(spec["type"][1], f"{path}:{spec['type'][0].start_mark.line + 1}")
    if "name" in spec:
        pattern = str(spec["name"][1])
        matcher = lambda n, g=pattern: fnmatch.fnmatchcase(n, g)  # noqa: E731
    else:
        pattern = str(spec["regex"][1])
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ProfileError(f"{path}:{spec['regex'][0].start_mark.line + 1}: bad regex "
                               f"'{pattern}': {exc}") from None
        matcher = lambda n, r=rx: r.search(n) is not None  # noqa: E731
    layers = None
    if "layers" in spec:
        lnode, lval = spec["layers"]
        layers = LayerSel(lval, lnode.start_mark.line + 1)
        layers.resolve(4096, f"{path}:{layers.line}")  # syntax check now; range check per model
    fallback = spec.get("fallback", (None, False))[1]
    if not isinstance(fallback, bool):
        raise ProfileError(f"{where}: 'fallback' must be true or false")
    return Rule(line, index, matcher, pattern, layers, type_name, fallback)
