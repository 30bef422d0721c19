"""Rules that pick a QuantSpec by path: ``{regex: QuantSpec | None}`` or a list of pairs, first match wins."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from quantize_jax.spec import QuantSpec

Rules = Mapping[str, "QuantSpec | None"] | Sequence[tuple[str, "QuantSpec | None"]]
"""Regular expressions over paths (``"layers/0/kernel"``) -> a spec, or None / ``"skip"`` to leave it float."""


def compile_rules(rules) -> list[tuple[re.Pattern, QuantSpec | None]]:
    """``[(compiled regex, spec or None)]`` in order; ``None`` marks a skip rule.

    Raises:
      ValueError: a rule is not a ``(str, QuantSpec | None | "skip")`` pair; the rule is shown.

    Example:
      >>> import quantize_jax as qj
      >>> [(r.pattern, s) for r, s in compile_rules({"norm": None})]
      [('norm', None)]
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"rules: each rule is (regex, QuantSpec or None), got {item!r}")
        pattern, spec = item
        if spec is not None and spec != "skip" and not isinstance(spec, QuantSpec):
            raise ValueError(f"rules: rule {pattern!r} maps to {spec!r}; expected a QuantSpec, None or 'skip'")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"rules: rule {pattern!r} is not a regular expression: {e}") from None
        out.append((regex, None if spec == "skip" else spec))
    return out
