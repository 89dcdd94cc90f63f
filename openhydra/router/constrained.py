"""Constrained decoding: the output always parses as JSON (and validates against a JSON-schema subset).

A character-level pushdown automaton walks the text generated so far; at each step the coordinator masks
the logits to the tokens whose decoded text keeps the output a valid prefix (``Constraint.mask``), and EOS
is allowed only once the value is complete. Masks are computed by walking a trie of the vocabulary's token
strings from the current automaton state (subtrees die at the first rejected character), except inside a
free string, where every token without ``"``, ``\\`` or a control character is valid by construction (a
precomputed mask) and only the few tokens holding those characters are walked. Masks are cached per
(grammar, automaton state), and grammars per (tokenizer, schema), so repeated states cost a dict lookup.

The supported JSON Schema subset and its compilation to automaton nodes are in router/schema_subset.py
(re-exported here: :func:`compile_schema`, :class:`UnsupportedSchema`, :class:`UnsatisfiableSchema`).

Limits, on purpose: whitespace runs between tokens are at most ``MAX_WS`` characters and numbers at most
``MAX_NUMBER`` characters (a weak model cannot loop on them); tokens whose bytes are not valid UTF-8 on their
own (pieces of a multi-byte character) are never chosen. A ``max_tokens`` cut can still leave the value
unfinished (finish_reason "length"), as with OpenAI.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from openhydra.router.schema_subset import (
    ANY,
    KEYWORDS,
    Node,
    ObjectSpec,
    UnsatisfiableSchema,
    UnsupportedSchema,
    any_value,
    compile_schema,
    json_object_node,
)

__all__ = ["ANY", "KEYWORDS", "Constraint", "Grammar", "Node", "ObjectSpec", "TokenTable", "UnsatisfiableSchema",
           "UnsupportedSchema", "advance", "advance_text", "any_value", "choice_state", "compile_schema",
           "grammar_for", "initial_state", "is_accepting", "json_object_node", "raw_sequence"]

MAX_WS = 4
MAX_NUMBER = 32
WS = " \n"  # no tabs or carriage returns: a sampled model would otherwise pad with them


# ---- the automaton ------------------------------------------------------------------------------------
# A state is a tuple of frames (the top is last); frames are tuples, so states hash (mask cache keys).
#   ("V", node, ws)                    a value is expected (leading whitespace counted in ws)
#   ("O", spec, seen, phase, key, ws)  inside an object; phase 0 after '{', 1 after a key, 2 after a value,
#                                      3 after ','; key: the property whose value comes next (None: free)
#   ("A", node, count, phase, ws)      inside an array; phase 0 after '[', 2 after an element, 3 after ','
#   ("S", esc, key)                    inside a free string; esc 0 plain, 1 after '\\', 10+n: n hex digits due
#   ("L", options, pos, key)           matching one of several exact texts (enum values, property names)
#   ("N", dfa, integer, length)        a number
#   ("R", text, pos)                   a raw literal (tool-call wrappers)
#   ("C", options, pos)                one of several (prefix, node, suffix) raw alternatives

State = tuple

_NUM: dict[str, dict[str, str]] = {
    "start": {"-": "minus", "0": "zero", **{d: "int" for d in "123456789"}},
    "minus": {"0": "zero", **{d: "int" for d in "123456789"}},
    "zero": {".": "dot", "e": "exp", "E": "exp"},
    "int": {**{d: "int" for d in "0123456789"}, ".": "dot", "e": "exp", "E": "exp"},
    "dot": {d: "frac" for d in "0123456789"},
    "frac": {**{d: "frac" for d in "0123456789"}, "e": "exp", "E": "exp"},
    "exp": {"+": "esign", "-": "esign", **{d: "edig" for d in "0123456789"}},
    "esign": {d: "edig" for d in "0123456789"},
    "edig": {d: "edig2" for d in "0123456789"},
    "edig2": {},  # at most two exponent digits: 1e99 is a double, 1e400 parses as infinity (or fails)
}
_NUM_ACCEPT = {"zero", "int", "frac", "edig", "edig2"}
_NUM_TO_END = {"start": 1, "minus": 1, "dot": 1, "exp": 1, "esign": 1}
"""Characters a number still needs from each state to end: a number only grows while it can still end
within ``MAX_NUMBER`` (``1e`` at the limit would be a dead end no token continues)."""
_HEX = set("0123456789abcdefABCDEF")


def initial_state(node: Node) -> State:
    return (("V", node, 0),)


def raw_sequence(prefix: str, node: Node, suffix: str) -> State:
    """prefix, then a value of ``node``, then suffix, all exact (a tool call's wrapper)."""
    frames: list[tuple] = []
    if suffix:
        frames.append(("R", suffix, 0))
    frames.append(("V", node, 0))
    if prefix:
        frames.append(("R", prefix, 0))
    return tuple(frames)


def choice_state(options: list[tuple[str, Node, str]]) -> State:
    """One of several raw-wrapped values, told apart by their prefixes (none a prefix of another)."""
    return (("C", tuple(options), 0),)


def _start_value(rest: State, node: Node, c: str) -> State | None:
    opts = tuple(o for o in node.literals if o[0] == c)
    if opts:
        return _settle((*rest, ("L", opts, 1, False)))
    if node.only_literals:
        return None
    if c == "{" and node.obj is not None:
        return (*rest, ("O", node.obj, frozenset(), 0, None, 0))
    if c == "[" and node.is_array:
        return (*rest, ("A", node, 0, 0, 0))
    if c == '"' and node.string:
        return (*rest, ("S", 0, False))
    if node.number and c in _NUM["start"]:
        return (*rest, ("N", _NUM["start"][c], node.integer, 1))
    return None


def _settle(state: State) -> State:
    """Pop a literal frame whose only option is fully matched (its end is certain)."""
    top = state[-1]
    if top[0] == "L" and all(len(o) == top[2] for o in top[1]):
        return _finish_literal(state[:-1], top[1][0], top[3])
    return state


def _finish_literal(rest: State, text: str, key: bool) -> State:
    if not key:
        return rest
    obj = rest[-1]
    name = obj[1].key_literals[text]
    return (*rest[:-1], ("O", obj[1], obj[2] | {name}, 1, name, 0))


def _value_node(spec: ObjectSpec, key: str | None) -> Node:
    if spec.free or key is None:
        return ANY
    return spec.properties[key]


def _open_keys(spec: ObjectSpec, seen: frozenset) -> tuple[str, ...]:
    return tuple(lit for lit, name in spec.key_literals.items() if name not in seen)


def advance(state: State, c: str) -> State | None:
    """The state after one more character, or None when ``c`` cannot follow."""
    while True:
        if not state:
            return None
        top = state[-1]
        kind = top[0]
        rest = state[:-1]
        if kind == "S":
            esc = top[1]
            if esc == 0:
                if c == '"':
                    if top[2]:  # a free key: its value may be anything
                        obj = rest[-1]
                        return (*rest[:-1], ("O", obj[1], obj[2], 1, None, 0))
                    return rest
                if c == "\\":
                    return (*rest, ("S", 1, top[2]))
                return state if c >= " " else None
            if esc == 1:
                if c in '"\\/bfnrt':
                    return (*rest, ("S", 0, top[2]))
                return (*rest, ("S", 14, top[2])) if c == "u" else None
            if c in _HEX:
                return (*rest, ("S", 0 if esc == 11 else esc - 1, top[2]))
            return None
        if kind == "V":
            if c in WS:
                return (*rest, ("V", top[1], top[2] + 1)) if top[2] < MAX_WS else None
            return _start_value(rest, top[1], c)
        if kind == "O":
            _, spec, seen, phase, key, ws = top
            if c in WS:
                return (*rest, ("O", spec, seen, phase, key, ws + 1)) if ws < MAX_WS else None
            if phase in (0, 3) and c == '"':
                if spec.free:
                    return (*rest, ("O", spec, seen, 1, None, 0), ("S", 0, True))
                opts = _open_keys(spec, seen)
                return (*rest, ("O", spec, seen, 1, None, 0), ("L", opts, 1, True)) if opts else None
            if phase == 1 and c == ":":
                return (*rest, ("O", spec, seen, 2, None, 0), ("V", _value_node(spec, key), 0))
            if phase == 2 and c == "," and (spec.free or _open_keys(spec, seen)):
                return (*rest, ("O", spec, seen, 3, None, 0))
            if phase in (0, 2) and c == "}" and spec.required <= seen:
                return rest
            return None
        if kind == "A":
            _, node, count, phase, ws = top
            if c in WS:
                return (*rest, ("A", node, count, phase, ws + 1)) if ws < MAX_WS else None
            if phase in (0, 2) and c == "]" and count >= node.min_items:
                return rest
            if phase == 2 and c == "," and (node.max_items is None or count < node.max_items):
                return (*rest, ("A", node, count, 3, 0))
            if phase in (0, 3) and (node.max_items is None or count < node.max_items):
                return _start_value((*rest, ("A", node, count + 1, 2, 0)), node.items, c)
            return None
        if kind == "N":
            _, dfa, integer, length = top
            nxt = _NUM[dfa].get(c)
            if nxt is not None and length + 1 + _NUM_TO_END.get(nxt, 0) > MAX_NUMBER:
                nxt = None
            if nxt is not None and not (integer and c in ".eE"):
                return (*rest, ("N", nxt, integer, length + 1))
            if dfa in _NUM_ACCEPT:
                state = rest  # the number ended: the parent takes c
                continue
            return None
        if kind == "L":
            _, options, pos, key = top
            opts = tuple(o for o in options if len(o) > pos and o[pos] == c)
            if opts:
                return _settle((*rest, ("L", opts, pos + 1, key)))
            done = [o for o in options if len(o) == pos]
            if done:
                state = _finish_literal(rest, done[0], key)
                continue
            return None
        if kind == "R":
            _, text, pos = top
            if text[pos] != c:
                return None
            return rest if pos + 1 == len(text) else (*rest, ("R", text, pos + 1))
        if kind == "C":
            _, options, pos = top
            opts = tuple(o for o in options if o[0][pos] == c)
            if not opts:
                return None
            if len(opts) == 1 and len(opts[0][0]) == pos + 1:
                _prefix, node, suffix = opts[0]
                return rest + raw_sequence("", node, suffix)
            return (*rest, ("C", opts, pos + 1))
        raise AssertionError(f"unknown frame {kind}")


def is_accepting(state: State) -> bool:
    """Whether the output so far is a complete value (EOS may come now)."""
    if not state:
        return True
    if len(state) != 1:
        return False
    top = state[0]
    if top[0] == "N":
        return top[1] in _NUM_ACCEPT
    if top[0] == "L":
        return any(len(o) == top[2] for o in top[1])
    return False


def advance_text(state: State, text: str) -> State | None:
    for c in text:
        state = advance(state, c)
        if state is None:
            return None
    return state


# ---- the vocabulary side ----------------------------------------------------------------------------


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-ins for the 256 bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes_table(tokenizer) -> list[bytes]:
    """The exact bytes each token id stands for (byte-level BPE or SentencePiece with byte fallback)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    pieces = [p or "" for p in pieces]
    decoder = _byte_decoder()
    byte_level = sum(1 for p in pieces if p.startswith("Ġ")) > len(pieces) // 20
    out: list[bytes] = []
    for p in pieces:
        if byte_level and all(ch in decoder for ch in p):
            out.append(bytes(decoder[ch] for ch in p))
        elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out.append(bytes([int(p[3:5], 16)]))
        else:
            out.append(p.replace("▁", " ").encode("utf-8"))
    return out


def _trie(entries: list[tuple[int, str]]) -> dict:
    root: dict = {}
    for token_id, text in entries:
        node = root
        for ch in text:
            node = node.setdefault(ch, {})
        node.setdefault(None, []).append(token_id)
    return root


class TokenTable:
    """Per tokenizer, computed once: token bytes and texts, the vocabulary trie, the free-string masks."""

    def __init__(self, tokenizer) -> None:
        self.bytes = token_bytes_table(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.text: list[str | None] = []
        for i, b in enumerate(self.bytes):
            try:
                text = b.decode("utf-8") if i not in special and b else None
            except UnicodeDecodeError:
                text = None
            self.text.append(text)
        self.size = len(self.text)
        valid = [(i, t) for i, t in enumerate(self.text) if t]
        self.trie = _trie(valid)
        plain = torch.zeros(self.size, dtype=torch.bool)
        special_entries = []
        for i, t in valid:
            if '"' in t or "\\" in t or any(ch < " " for ch in t):
                special_entries.append((i, t))
            else:
                plain[i] = True
        self.string_plain = plain
        """Tokens that keep a free string open whatever came before: no quote, backslash or control char."""
        self.string_special_trie = _trie(special_entries)

    @classmethod
    def of(cls, tokenizer) -> TokenTable:
        table = getattr(tokenizer, "_openhydra_token_table", None)
        if table is None:
            with _LOCK:
                table = getattr(tokenizer, "_openhydra_token_table", None)
                if table is None:
                    table = cls(tokenizer)
                    tokenizer._openhydra_token_table = table
        return table


_LOCK = threading.Lock()


def _walk(trie: dict, state: State, out: list[int]) -> None:
    todo = [(trie, state)]
    while todo:
        node, st = todo.pop()
        for ch, child in node.items():
            if ch is None:
                continue
            nxt = advance(st, ch)
            if nxt is None:
                continue
            ids = child.get(None)
            if ids:
                out.extend(ids)
            if len(child) > (1 if ids else 0):
                todo.append((child, nxt))


class Grammar:
    """One compiled constraint for one tokenizer; caches the mask of every automaton state it has seen."""

    MAX_CACHED = 512

    def __init__(self, start: State, table: TokenTable) -> None:
        self.start = start
        self.table = table
        self._masks: OrderedDict[State, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def allowed(self, state: State) -> torch.Tensor:
        """bool [table.size]: the tokens that keep the output a valid prefix (EOS not included)."""
        with self._lock:
            mask = self._masks.get(state)
            if mask is not None:
                self._masks.move_to_end(state)
                return mask
        ids: list[int] = []
        top = state[-1] if state else None
        if top is not None and top[0] == "S" and top[1] == 0:
            _walk(self.table.string_special_trie, state, ids)
            mask = self.table.string_plain.clone()
        else:
            if state:
                _walk(self.table.trie, state, ids)
            mask = torch.zeros(self.table.size, dtype=torch.bool)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        with self._lock:
            self._masks[state] = mask
            if len(self._masks) > self.MAX_CACHED:
                self._masks.popitem(last=False)
        return mask


_GRAMMARS: OrderedDict[tuple[int, str], Grammar] = OrderedDict()


def grammar_for(tokenizer, key: str, build) -> Grammar:
    """The cached Grammar for (tokenizer, key); ``build()`` gives its start state the first time."""
    cache_key = (id(tokenizer), key)
    with _LOCK:
        grammar = _GRAMMARS.get(cache_key)
        if grammar is not None:
            _GRAMMARS.move_to_end(cache_key)
            return grammar
    grammar = Grammar(build(), TokenTable.of(tokenizer))
    with _LOCK:
        _GRAMMARS[cache_key] = grammar
        while len(_GRAMMARS) > 32:
            _GRAMMARS.popitem(last=False)
    return grammar


class Constraint:
    """One request's constrained output: masks logits, then follows each chosen token."""

    def __init__(self, grammar: Grammar, eos_token_ids: set[int]) -> None:
        self.grammar = grammar
        self.state: State = grammar.start
        self.eos_token_ids = eos_token_ids
        self.mask_seconds = 0.0
        self.steps = 0

    def mask(self, vocab_size: int) -> torch.Tensor:
        """bool [vocab_size] (the model's logits width): True where the token may come next."""
        import time

        began = time.perf_counter()
        table = self.grammar.table
        full = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, table.size)
        if self.state:
            full[:n] = self.grammar.allowed(self.state)[:n]
        if is_accepting(self.state):
            for eos in self.eos_token_ids:
                if eos < vocab_size:
                    full[eos] = True
        self.mask_seconds += time.perf_counter() - began
        self.steps += 1
        return full

    def advance(self, token_id: int) -> None:
        if token_id in self.eos_token_ids:
            self.state = ()
            return
        text = self.grammar.table.text[token_id] if token_id < self.grammar.table.size else None
        nxt = advance_text(self.state, text) if text else None
        if nxt is None:
            raise ValueError(f"token {token_id} ({text!r}) does not continue the constrained output")
        self.state = nxt

    @property
    def complete(self) -> bool:
        return is_accepting(self.state)
