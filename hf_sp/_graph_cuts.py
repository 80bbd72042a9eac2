"""Cut points of an autograd graph, where one backward pass can stop and the next one start (the Fisher's hooks).

A backward pass from ``root`` (the logits' node) reaches a node ``t`` only along paths of the graph; a node ``c``
*dominates* ``t`` when every path from ``root`` to ``t`` runs through ``c``. Then the gradient of anything at or
below ``t`` is a function of the gradient arriving at ``c`` alone, so the backward pass can be split there: a first
pass from ``root`` down to ``c``, then a second from ``c``, with the first pass's gradient of ``c`` as its cotangent,
down to ``t``. The hooks use this to take each stretch of layers' output gradients and turn them into squares
before the next stretch is computed, so that the gradients of all layers are never held at once (on CPU, the
hundreds of megabytes of fresh memory they took were page-faulted in at every batch).

The dominators come from one pass over the graph in topological order (the graph is acyclic), with the
``intersect`` step of Cooper, Harvey and Kennedy's "A Simple, Fast Dominance Algorithm" (2001).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Node = Any  # torch.autograd.graph.Node (identity is the C++ node: the same Python object while it is alive)


def _children(node: Node) -> list[Node]:
    return [n for n, _ in node.next_functions if n is not None]


def reachable(root: Node) -> set[Node]:
    """Every node of the graph below ``root`` (``root`` included)."""
    return made_between([root], [])


def made_between(tops: Sequence[Node | None], bottoms: Sequence[Node | None]) -> set[Node]:
    """The nodes below ``tops`` (included) down to ``bottoms`` (excluded): those that a call made between its inputs
    (``bottoms``) and its outputs (``tops``)."""
    stop = {n for n in bottoms if n is not None}
    seen: set[Node] = set()
    stack = [n for n in tops if n is not None and n not in stop]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(c for c in _children(node) if c not in stop and c not in seen)
    return seen


def dominators(root: Node) -> dict[Node, Node]:
    """The immediate dominator of every node reachable from ``root`` (``root``'s is itself)."""
    order: list[Node] = []
    seen = {root}
    stack = [(root, iter(_children(root)))]
    while stack:  # iterative depth-first post-order: graphs of deep models are thousands of nodes deep
        node, rest = stack[-1]
        for child in rest:
            if child not in seen:
                seen.add(child)
                stack.append((child, iter(_children(child))))
                break
        else:
            stack.pop()
            order.append(node)
    number = {n: i for i, n in enumerate(order)}
    parents: dict[Node, list[Node]] = {}
    for node in order:
        for child in _children(node):
            parents.setdefault(child, []).append(node)
    idom = {root: root}

    def intersect(a: Node, b: Node) -> Node:
        while a is not b:
            while number[a] < number[b]:
                a = idom[a]
            while number[b] < number[a]:
                b = idom[b]
        return a

    for node in reversed(order):  # reverse post-order of a DAG: every parent before its children
        if node is root:
            continue
        above = parents[node]
        dom = above[0]
        for p in above[1:]:
            dom = intersect(dom, p)
        idom[node] = dom
    return idom


def cut_points(
    root: Node, sources: Sequence[Node | None], cuts: Mapping[int, Node], sizes: Mapping[int, int], minimum: int = 1
) -> list[int]:
    """Where the backward pass from ``root`` can be split, as indices into ``sources``, in increasing order.

    ``sources[i]`` is the node that made the ``i``-th recorded tensor, in the order of the forward pass (``None``:
    not in the graph); ``cuts[i]``, for the candidates, the node that alone passes that tensor on (its clone's). A
    candidate is a cut when ``cuts[i]`` dominates ``sources[i]`` (no other way round it: the gradient that reaches
    ``cuts[i]`` is the tensor's whole gradient) and every reachable ``sources[j]``, ``j < i``. A pass that stops at
    a cut and the next one that starts there share it; a cut is kept only if the stretch from the previous kept cut
    (that one included) holds at least ``minimum`` of the ``sizes`` (of the tensors asked for), so that no pass is
    made for too little.
    """
    idom = dominators(root)
    wanted = set(cuts.values())
    chains: list[set[Node] | None] = []  # for every reachable source, the cut nodes that dominate it
    for node in sources:
        if node is None or node not in idom:
            chains.append(None)
            continue
        chain, x = set(), node
        while x is not root:
            if x in wanted:
                chain.add(x)
            x = idom[x]
        chains.append(chain)
    kept: list[int] = []
    since = 0  # sizes from the last kept cut on
    for i, chain in enumerate(chains):
        if chain is None:
            continue
        # dominance is transitive: a node that dominates the last cut's source dominates everything before it
        last = kept[-1] if kept else 0
        cut = cuts.get(i)
        if (
            cut is not None
            and since >= max(1, minimum)
            and cut in chain
            and all(ch is None or cut in ch for ch in chains[last:i])
        ):
            kept.append(i)
            since = 0
        since += sizes.get(i, 0)
    return kept
