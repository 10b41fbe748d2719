"""No import cycle anywhere in abft_fast, function-level imports included (they only hide a cycle
from Python's import order, not from a reader): every strongly connected component of the
module import graph (grimp, import-linter's graph) is a single module. The import-linter
contract "acyclic_siblings" in pyproject.toml checks the same at every package level."""
import grimp


def cycles(graph, root="abft_fast"):
    """Import cycles (sorted module lists) among root's modules; an import of one's own parent
    package (``from .. import x``: the package is initialised by then) is not an edge."""
    mods = sorted(m for m in graph.modules if m == root or m.startswith(root + "."))
    adj = {m: sorted(x for x in graph.find_modules_directly_imported_by(m)
                     if x in mods and not m.startswith(x + "."))
           for m in mods}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for m in mods:
        if m not in index:
            visit(m)
    return out


def test_no_module_of_abft_fast_is_in_an_import_cycle():
    graph = grimp.build_graph("abft_fast")
    assert "abft_fast.ops.available" in graph.modules and "abft_fast.ops.cuda_ext" in graph.modules
    assert cycles(graph) == []


def test_the_check_sees_a_cycle_hidden_in_a_function():
    graph = grimp.build_graph("abft_fast")
    graph.add_import(importer="abft_fast.ops.available", imported="abft_fast.ops.attention")
    found = cycles(graph)
    assert len(found) == 1 and {"abft_fast.ops.attention", "abft_fast.ops.available"} <= set(found[0])
