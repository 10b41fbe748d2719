"""ICL prompts for ABFT from the StaICC data sets: text, label positions, padded batches.

A prompt is k demonstrations ``x_i y_i`` and a query ``x_q`` written with StaICC's template, with
the template's trailing whitespace removed at the end, so the next token to predict is the first
token of " <label>" (the same token each demonstration's label starts with).

Splits follow StaICC: training prompts come from the calibration split (the 1,024-example pool),
evaluation uses StaICC's fixed test queries with its seeded demonstration sampling from the
demonstration split. The two never share an example.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import torch

# CLI name -> (StaICC loader class name, [calibration, demonstration, test] sizes).
_STD = [1024, 4096, 512]
DATASETS = {
    "sst2": ("glue_sst2", _STD),
    "mr": ("rotten_tomatoes", _STD),
    "fp": ("financial_phrasebank", [1024, 512, 512]),
    "sst5": ("sst5", _STD),
    "trec": ("trec", _STD),
    "subj": ("subjective", _STD),
    "emotion": ("tweet_eval_emotion", [1024, 3192, 512]),
    "hate": ("tweet_eval_hate", _STD),
}
ALIASES = {"rotten_tomatoes": "mr", "financial_phrasebank": "fp", "subjective": "subj",
           "tweet_eval_emotion": "emotion", "tweet_eval_hate": "hate", "glue_sst2": "sst2"}
# StaICC's L9(3^4) orthogonal table over (instruction, input prefixes, label prefix, label affix).
L9 = [[0, 0, 0, 0], [0, 1, 1, 1], [0, 2, 2, 2], [1, 0, 1, 2], [1, 1, 2, 0], [1, 2, 0, 1],
      [2, 0, 2, 1], [2, 1, 0, 2], [2, 2, 1, 0]]


@dataclass(frozen=True)
class Template:
    """StaICC's direct-ICL template pieces."""
    instruction: str = ""
    input_prefixes: tuple = ("sentence: ",)
    input_affixes: tuple = (" ",)
    label_prefix: str = "sentiment: "
    label_affix: str = "\n"
    query_prefix: str = ""


@dataclass
class Example:
    inputs: tuple  # input texts (one per input element)
    label: int     # index into the label words


@dataclass
class Prompt:
    """One ICL prompt: text, char offset of each demonstration's label word, labels."""
    text: str
    label_chars: list   # char index where each demonstration's label word starts
    demo_labels: list   # label index of each demonstration
    query_label: int    # gold label of the query (-1 if unknown)
    demo_chars: list | None = None  # char index where each demonstration starts
    query_char: int | None = None   # char index where the query starts
    head_chars: int = 0             # length of the instruction before the first demonstration

    def drop_demos(self, n: int) -> Prompt:
        """The same prompt without its first ``n`` demonstrations (the farthest from the query);
        the instruction and the query stay."""
        if self.demo_chars is None or self.query_char is None:
            raise ValueError("this prompt does not record where its demonstrations start")
        if not 0 <= n <= len(self.demo_chars):
            raise ValueError(f"cannot drop {n} of {len(self.demo_chars)} demonstrations")
        if n == 0:
            return self
        cut = self.demo_chars[n] if n < len(self.demo_chars) else self.query_char
        shift = cut - self.head_chars
        return Prompt(self.text[:self.head_chars] + self.text[cut:],
                      [c - shift for c in self.label_chars[n:]], list(self.demo_labels[n:]),
                      self.query_label, [c - shift for c in self.demo_chars[n:]],
                      self.query_char - shift, self.head_chars)


def write_prompt(template: Template, label_words, demos, query_inputs) -> Prompt | tuple:
    """Write a prompt the way StaICC does (direct mode), tracking label offsets.

    ``demos``: list of ``Example``; ``query_inputs``: the query's input texts. The final label
    prefix loses its trailing whitespace (``"sentiment: "`` -> ``"sentiment:"``).
    """
    n_in = len(template.input_prefixes)
    if len(template.input_affixes) != n_in:
        raise ValueError("template: input_prefixes and input_affixes differ in length")
    parts, label_chars, pos = [template.instruction], [], len(template.instruction)
    demo_chars = []

    def add(s):
        nonlocal pos
        parts.append(s)
        pos += len(s)

    for ex in demos:
        if len(ex.inputs) != n_in:
            raise ValueError(f"demos: an example has {len(ex.inputs)} inputs, template has {n_in}")
        if not 0 <= ex.label < len(label_words):
            raise ValueError(f"demos: label {ex.label} outside 0..{len(label_words) - 1}")
        demo_chars.append(pos)
        for i in range(n_in):
            add(template.input_prefixes[i] + ex.inputs[i] + template.input_affixes[i])
        add(template.label_prefix)
        label_chars.append(pos)
        add(label_words[ex.label] + template.label_affix)
    query_char = pos
    add(template.query_prefix)
    if len(query_inputs) != n_in:
        raise ValueError(f"query_inputs: {len(query_inputs)} inputs, template has {n_in}")
    for i in range(n_in):
        add(template.input_prefixes[i] + query_inputs[i] + template.input_affixes[i])
    add(template.label_prefix)
    text = "".join(parts).rstrip()
    return Prompt(text, label_chars, [ex.label for ex in demos], -1, demo_chars, query_char,
                  len(template.instruction))


@dataclass
class Task:
    """One data set: label words, template, and StaICC's three splits."""
    name: str
    staicc_name: str
    label_words: list
    template: Template
    alt_templates: dict          # StaICC's alternate template pieces (for template consistency)
    pool: list                   # calibration split: training pool (Example list)
    demonstrations: list         # demonstration split
    test: list                   # test split (fixed queries)
    test_demos: list = field(default_factory=list)  # StaICC sampler: index q + r*len(test) -> demo ids

    def prompt(self, demo_ids, query: Example, template: Template | None = None,
               demo_set=None) -> Prompt:
        demo_set = self.demonstrations if demo_set is None else demo_set
        p = write_prompt(template or self.template, self.label_words,
                         [demo_set[i] for i in demo_ids], query.inputs)
        p.query_label = query.label
        return p


def load_task(name: str, k: int = 4) -> Task:
    """Load a data set from StaICC's offline copy (names: ``DATASETS`` keys or StaICC names)."""
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}; got {name!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    try:
        from StaICC.util import experimentor, hgf_dataset_loader
    except ImportError as e:  # pragma: no cover
        raise RuntimeError("the StaICC package is needed for the data sets: pip install staicc") from e
    cls_name, dividing = DATASETS[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = getattr(hgf_dataset_loader, cls_name)()
        ex = experimentor.single_experimentor(original_dataset=loader, k=k, dividing=dividing)
    trip = ex.triplet_dataset
    words = trip.get_label_space()
    pw = ex.prompt_former.get_config_dict()
    template = Template(pw["instruction"], tuple(pw["input_text_prefixes"]),
                        tuple(pw["input_text_affixes"]), pw["label_prefix"], pw["label_affix"],
                        pw["query_prefix"])

    def split(ds):
        return [Example(tuple(ds.get_input_text(i)), ds.find_index_from_label(ds.get_label(i)))
                for i in range(len(ds))]

    test_demos = [list(ex.demonstration_sampler[i]) for i in range(len(ex.demonstration_sampler))]
    return Task(key, trip.get_dataset_name(), words, template, trip.get_alternate_template(),
                split(trip.calibration), split(trip.demonstration), split(trip.test), test_demos)


def training_prompts(task: Task, n: int, k: int = 4, seed: int = 0) -> list:
    """``n`` prompts, each from k + 1 distinct pool examples (the last one is the query)."""
    if n < 1:
        raise ValueError(f"n (training prompts) must be >= 1; got {n}")
    if k + 1 > len(task.pool):
        raise ValueError(f"k + 1 = {k + 1} exceeds the pool size {len(task.pool)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = rng.sample(range(len(task.pool)), k + 1)
        out.append(task.prompt(ids[:k], task.pool[ids[k]], demo_set=task.pool))
    return out


def eval_prompts(task: Task, n_queries: int | None = None, repeats: int = 2) -> list:
    """StaICC's fixed test inputs: the first ``n_queries`` test queries x ``repeats`` samplings.

    Ordered sampling-major (all queries of sampling 0, then of sampling 1), as StaICC does.
    """
    nt = len(task.test)
    n = nt if n_queries is None else n_queries
    if not 1 <= n <= nt:
        raise ValueError(f"n_queries must be in 1..{nt}; got {n_queries}")
    if not 1 <= repeats <= len(task.test_demos) // nt:
        raise ValueError(f"repeats must be in 1..{len(task.test_demos) // nt}; got {repeats}")
    return [task.prompt(task.test_demos[q + r * nt], task.test[q])
            for r in range(repeats) for q in range(n)]


def demo_sampling_prompts(task: Task, n_queries: int, samplings: int = 8) -> list:
    """StaICC's demonstration-consistency set: query q with samplings ``q + t * (2 * nt // 8)``.

    Ordered query-major: prompts ``[q * samplings + t]``.
    """
    stride = len(task.test_demos) // samplings
    if not 1 <= n_queries <= stride:
        raise ValueError(f"n_queries must be in 1..{stride}; got {n_queries}")
    return [task.prompt(task.test_demos[q + t * stride], task.test[q])
            for q in range(n_queries) for t in range(samplings)]


def template_variants(task: Task) -> list:
    """The 9 templates of StaICC's L9 orthogonal design over the alternate template pieces."""
    alt = task.alt_templates
    out = []
    for row in L9:
        out.append(Template(alt["instruction"][row[0]], tuple(alt["input_text_prefixes"][row[1]]),
                            task.template.input_affixes, alt["label_prefix"][row[2]],
                            alt["label_affix"][row[3]], task.template.query_prefix))
    return out


def template_prompts(task: Task, n_queries: int) -> list:
    """Query q (first demonstration sampling) under each of the 9 templates; query-major."""
    if not 1 <= n_queries <= len(task.test):
        raise ValueError(f"n_queries must be in 1..{len(task.test)}; got {n_queries}")
    temps = template_variants(task)
    return [task.prompt(task.test_demos[q], task.test[q], template=t)
            for q in range(n_queries) for t in temps]


# ----------------------------------------------------------------------------- tokenization

def _token_at(offsets, char):
    for t, (a, b) in enumerate(offsets):
        if a <= char < b:
            return t
    return -1


def label_token_ids(tokenizer, label_words, label_prefix: str = "label: ") -> list:
    """Id of the first token of " <word>" for each label word, as it appears after the prefix.

    Raises if two labels share their first token (they could not be told apart).
    """
    ids = []
    for w in label_words:
        text = label_prefix.rstrip() + " " + w
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        t = _token_at(enc["offset_mapping"], len(label_prefix.rstrip()) + 1)
        if t < 0:
            raise ValueError(f"label word {w!r}: no token covers its first character")
        ids.append(enc["input_ids"][t])
    if len(set(ids)) != len(ids):
        dup = [w for w, i in zip(label_words, ids) if ids.count(i) > 1]
        raise ValueError(f"label words {dup} share their first token; cannot score them apart")
    return ids


@dataclass
class Encoded:
    input_ids: list
    label_pos: list    # token index of each demonstration's label
    demo_labels: list
    query_label: int
    dropped: int = 0   # demonstrations dropped (from the front) to fit max_length


def context_length(model, max_length: int = 0) -> int | None:
    """The longest prompt to build for ``model``: ``max_length`` if > 0, else the model config's
    ``max_position_embeddings`` (None if it has none)."""
    if max_length:
        return int(max_length)
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _fit(tokenizer, p, enc, max_length):
    """Drop the fewest leading demonstrations so that ``p`` fits in ``max_length`` tokens.
    Returns (prompt, encoding, dropped)."""
    k, n = len(p.label_chars), len(enc["input_ids"])
    if p.demo_chars is None:
        raise ValueError(f"a prompt has {n} tokens > max_length {max_length} and records no "
                         "demonstration offsets to truncate")
    offs = enc["offset_mapping"]
    starts = [_token_at(offs, c) for c in p.demo_chars] + [_token_at(offs, p.query_char)]
    first = starts[0] if starts[0] >= 0 else 0
    drop = 1
    while drop < k and starts[drop] >= 0 and n - (starts[drop] - first) > max_length:
        drop += 1
    while True:  # the estimate from the full prompt's offsets, checked on the real tokenization
        q = p.drop_demos(drop)
        e = tokenizer(q.text, return_offsets_mapping=True)
        if len(e["input_ids"]) <= max_length:
            return q, e, drop
        if drop == k:
            raise ValueError(f"the query alone (no demonstrations) has {len(e['input_ids'])} "
                             f"tokens > max_length {max_length}: {q.text[-200:]!r}")
        drop += 1


def encode(tokenizer, prompts, max_length: int | None = None, label_ids=None,
           truncate: bool = False) -> list:
    """Tokenize prompts (with the tokenizer's special tokens) and locate each label token.

    The label position is the token covering the label word's first character (found through
    the fast tokenizer's offset mapping, so it follows the real tokenization of the whole prompt).
    With ``label_ids`` (from ``label_token_ids``), warns when a demonstration's label is not
    tokenized to its label id (e.g. a token merged across the label's boundary).
    A prompt longer than ``max_length`` tokens raises, or with ``truncate`` loses its first
    demonstrations (the farthest from the query; never the query or the instruction) until it
    fits; ``Encoded.dropped`` counts them.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer must be a fast (Rust) tokenizer: offsets are needed")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None; got {max_length!r}")
    out, off_id, n_cut = [], 0, 0
    for p in prompts:
        enc = tokenizer(p.text, return_offsets_mapping=True)
        dropped = 0
        if truncate and max_length is not None and len(enc["input_ids"]) > max_length:
            p, enc, dropped = _fit(tokenizer, p, enc, max_length)
            n_cut += 1
        offs = enc["offset_mapping"]
        pos = []
        for c in p.label_chars:
            t = _token_at(offs, c)
            if t < 0:
                raise ValueError(f"no token covers the label starting at char {c} of {p.text!r}")
            pos.append(t)
        if label_ids is not None:
            off_id += sum(enc["input_ids"][t] != label_ids[lab] for t, lab in zip(pos, p.demo_labels))
        if max_length is not None and len(enc["input_ids"]) > max_length:
            raise ValueError(f"a prompt has {len(enc['input_ids'])} tokens > max_length {max_length}")
        out.append(Encoded(list(enc["input_ids"]), pos, list(p.demo_labels), p.query_label,
                           dropped))
    if n_cut:
        warnings.warn(f"{n_cut} of {len(out)} prompts were longer than {max_length} tokens and "
                      f"lost {sum(e.dropped for e in out)} leading demonstrations in all",
                      stacklevel=2)
    if off_id:
        warnings.warn(f"{off_id} demonstration label(s) are not tokenized as their label token; "
                      "their attention position is the token covering the label's first character",
                      stacklevel=2)
    return out


@dataclass
class Batch:
    """Right-padded batch. rows: last real position; cols: demonstration label positions."""
    input_ids: torch.Tensor       # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    rows: torch.Tensor            # [B, 1] int64
    cols: torch.Tensor            # [B, C] int64, -1 unused
    correct: torch.Tensor         # [B, C] bool: demo label == query label
    lengths: torch.Tensor         # [B] int64 real lengths (n_t)
    query_label: torch.Tensor     # [B] int64

    def to(self, device):
        return type(self)(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def collate(items, pad_id: int = 0) -> Batch:
    if not items:
        raise ValueError("items must be non-empty")
    B = len(items)
    L = max(len(e.input_ids) for e in items)
    C = max(1, max(len(e.label_pos) for e in items))
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    am = torch.zeros((B, L), dtype=torch.long)
    cols = torch.full((B, C), -1, dtype=torch.long)
    correct = torch.zeros((B, C), dtype=torch.bool)
    for b, e in enumerate(items):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        am[b, :n] = 1
        for j, (p, lab) in enumerate(zip(e.label_pos, e.demo_labels)):
            cols[b, j] = p
            correct[b, j] = lab == e.query_label
    lengths = am.sum(1)
    return Batch(ids, am, (lengths - 1)[:, None], cols, correct, lengths,
                 torch.tensor([e.query_label for e in items], dtype=torch.long))



# ----------------------------------------------------------------------------- multi-query ABFT

def prediction_rows(e: Encoded) -> list:
    """Multi-query ABFT's prediction rows of one prompt, one slot per demonstration plus one for
    the query: slot i < k is the token just before demonstration i's label (the position that
    predicts label i) when demonstration i has at least one earlier label (i >= 1), else -1;
    slot k is the prompt's last token (the query's prediction point)."""
    k = len(e.label_pos)
    rows = [-1] + [e.label_pos[i] - 1 for i in range(1, k)] if k else []
    return rows + [len(e.input_ids) - 1]


@dataclass
class MultiQueryBatch(Batch):
    """A ``Batch`` whose probe rows are every prediction point (``prediction_rows``), with each
    row's own label sets. R = C + 1: slot r < C is demonstration r's prediction row, slot C the
    query's (the last real token); unused slots are -1 in ``rows`` and inactive.

    ``correct`` / ``query_label`` / ``lengths`` keep their ``Batch`` meaning (the query row)."""
    row_correct: torch.Tensor = None  # [B, R, C] bool: column is an earlier label equal to row's label
    row_valid: torch.Tensor = None    # [B, R, C] bool: column is a label before the row (k_r = sum)
    row_lengths: torch.Tensor = None  # [B, R] int64: row position + 1 (the row's prompt length n_r)
    row_active: torch.Tensor = None   # [B, R] bool: the slot is a prediction row


def collate_multi_query(items, pad_id: int = 0) -> MultiQueryBatch:
    """Right-padded batch with all prediction rows (see ``MultiQueryBatch``).

    Row r of demonstration r sees only the labels of demonstrations 0..r-1 (columns at or after
    the row never count, even though causal attention would give them 0 anyway); its I+ are those
    whose label equals demonstration r's label, its I- the other earlier ones. The query row sees
    all k labels with the query's gold label, exactly as ``collate``'s single row."""
    base = collate(items, pad_id)
    B, C = base.cols.shape
    R = C + 1
    rows = torch.full((B, R), -1, dtype=torch.long)
    correct = torch.zeros((B, R, C), dtype=torch.bool)
    valid = torch.zeros((B, R, C), dtype=torch.bool)
    for b, e in enumerate(items):
        k = len(e.label_pos)
        pr = prediction_rows(e)
        for r in range(k):  # demonstration rows
            if pr[r] < 0:
                continue
            rows[b, r] = pr[r]
            for c in range(r):
                if e.label_pos[c] >= pr[r]:  # a label at or after the row: never counts
                    continue
                valid[b, r, c] = True
                correct[b, r, c] = e.demo_labels[c] == e.demo_labels[r]
        rows[b, C] = pr[k]
        for c in range(k):
            valid[b, C, c] = True
            correct[b, C, c] = e.demo_labels[c] == e.query_label
    active = rows >= 0
    lengths = torch.where(active, rows + 1, torch.zeros_like(rows))
    return MultiQueryBatch(base.input_ids, base.attention_mask, rows, base.cols, base.correct,
                           base.lengths, base.query_label, correct, valid, lengths, active)
