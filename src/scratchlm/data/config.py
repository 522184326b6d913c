"""The data stage's settings: reading, clean-up and quality filters, deduplication, shards.

Plain dataclasses with nothing else, so that a config can be loaded (and a model used) without
importing the data pipeline. A field's docstring is its help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchlm.errors import ScratchError

# The quality filters of each preset, in the order they run.
PRESETS = {
    "web": ("gopher_repetition", "gopher_quality", "c4"),  # FineWeb's order
    "books": ("gopher_repetition", "gopher_quality"),
    "none": (),
}
# What the books preset changes from datatrove's defaults, and why: a play's speaker names repeat
# on their own lines by design (a third of a scene's lines can be duplicates), and spaCy splits
# the commas, colons and full stops of short verse lines into words of their own, so that a
# fifth to a quarter of a scene's words hold no letter.
BOOKS = {"gopher_repetition": {"dup_line_frac": 0.0},
         "gopher_quality": {"max_non_alpha_words_ratio": 0.6}}


@dataclass
class GopherRepetitionConfig:
    """datatrove's GopherRepetitionFilter (Rae et al. 2021, table A1). A value of None is the
    preset's; 0 switches a rule off, as in datatrove."""

    dup_line_frac: float | None = None
    """Most lines (split at runs of newlines) that repeat an earlier line, as a share of the
    lines (web: 0.3; books: 0, off)."""
    dup_para_frac: float | None = None
    """Most paragraphs (split at blank lines) that repeat an earlier one (0.3)."""
    dup_line_char_frac: float | None = None
    """Most characters in repeated lines, as a share of the text's characters (0.2)."""
    dup_para_char_frac: float | None = None
    """Most characters in repeated paragraphs (0.2)."""
    top_n_grams: list[float] | None = None
    """For word 2-, 3-, 4-grams: most characters in the most frequent one, counted over all its
    occurrences, as a share of the text's characters ([0.2, 0.18, 0.16])."""
    dup_n_grams: list[float] | None = None
    """For word 5- to 10-grams: most characters in n-grams repeating an earlier one (a repeat's
    words are not counted again in overlapping n-grams) ([0.15, 0.14, 0.13, 0.12, 0.11, 0.1])."""


@dataclass
class GopherQualityConfig:
    """datatrove's GopherQualityFilter. Words that are only symbols do not count as words in the
    word counts and the mean length. None is the preset's value; 0 switches a rule off."""

    min_doc_words: int | None = None
    """Fewest words (50)."""
    max_doc_words: int | None = None
    """Most words (100,000)."""
    min_avg_word_length: float | None = None
    """Shortest mean word length in characters (3)."""
    max_avg_word_length: float | None = None
    """Longest mean word length (10)."""
    max_symbol_word_ratio: float | None = None
    """Most '#', and separately most ellipses, per word, symbols included (0.1)."""
    max_bullet_lines_ratio: float | None = None
    """Most lines starting with '•' or '-' (0.9)."""
    max_ellipsis_lines_ratio: float | None = None
    """Most lines ending in an ellipsis (0.3)."""
    max_non_alpha_words_ratio: float | None = None
    """Despite datatrove's name, the fewest words with a letter, as a share of all words,
    symbols included (web: 0.8; books: 0.6)."""
    min_stop_words: int | None = None
    """Fewest distinct stop words present (2)."""
    stop_words: list[str] | None = None
    """The stop words, compared as they are written (the be to of and that have with)."""


@dataclass
class C4Config:
    """datatrove's C4QualityFilter (Raffel et al. 2020): line rules that drop lines (the text
    that goes on is the kept lines), document rules that drop the document. None is the
    preset's value."""

    remove_citations: bool | None = None
    """Remove Wikipedia-style citation marks ([1], [edit], [citation needed]) from lines (on)."""
    filter_no_terminal_punct: bool | None = None
    """Drop lines that do not end in . ? ! " or ', or that end in an ellipsis (on)."""
    min_num_sentences: int | None = None
    """Fewest sentences in the kept lines (5; -1 switches the rule off)."""
    min_words_per_line: int | None = None
    """Drop lines of fewer words, split at whitespace (3; -1 off)."""
    max_word_length: int | None = None
    """Drop lines with a longer word (1000; -1 off)."""
    filter_lorem_ipsum: bool | None = None
    """Drop documents with "lorem ipsum" in a kept line (on)."""
    filter_javascript: bool | None = None
    """Drop lines mentioning javascript (on)."""
    filter_curly_bracket: bool | None = None
    """Drop documents with '{' in a kept line (on)."""
    filter_policy: bool | None = None
    """Drop lines with terms-of-use, privacy or cookie notices (on)."""


@dataclass
class FilterConfig:
    preset: str = "auto"
    """The quality filters and their settings: "web" = gopher_repetition, gopher_quality, c4,
    datatrove's defaults, in FineWeb's order; "books" = gopher_repetition, gopher_quality for
    clean book and play text (no C4 line rules: they would delete a play's speaker lines and
    its unpunctuated verse; dup_line_frac off, max_non_alpha_words_ratio 0.6); "none"; "auto" =
    books when the only input is the built-in corpus, else web."""
    steps: list[str] | None = None
    """The filters to run, in order, instead of the preset's (its settings still apply):
    gopher_repetition, gopher_quality, c4."""
    words: str = "spacy"
    """Word splitting for the Gopher filters: "spacy" (datatrove's: spaCy's blank English
    tokenizer, punctuation split off) or "whitespace" (no spaCy; punctuation stays on words)."""
    normalize: bool = True
    """NFC normalisation, control characters removed, horizontal whitespace collapsed, lines
    stripped, runs of blank lines cut to one (before the filters)."""
    boilerplate: list[str] = field(default_factory=list)
    """Lines containing any of these phrases (case-insensitive) are dropped before the filters
    (C4's own javascript and policy line rules are part of the c4 filter)."""
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    """Gopher's repetition rules."""
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    """Gopher's quality rules."""
    c4: C4Config = field(default_factory=C4Config)
    """C4's rules."""

    def __post_init__(self) -> None:
        if self.preset not in (*PRESETS, "auto"):
            raise ScratchError(f"config data.filters.preset: {self.preset!r} is not one of "
                               f"{[*PRESETS, 'auto']}")
        unknown = [s for s in self.steps or () if s not in PRESETS["web"]]
        if unknown:
            raise ScratchError(f"config data.filters.steps: unknown filter {unknown[0]!r}; "
                               f"choose from {list(PRESETS['web'])}")
        if self.words not in ("spacy", "whitespace"):
            raise ScratchError(f"config data.filters.words: {self.words!r} is not 'spacy' or "
                               "'whitespace'")


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose normalised text (lower-cased, whitespace collapsed) was seen."""
    near: bool = True
    """Drop near-duplicates found by MinHash + LSH."""
    threshold: float = 0.8
    """Estimated Jaccard similarity of word shingles at which two documents are duplicates."""
    num_perm: int = 128
    """MinHash signature length."""
    bands: int = 16
    """LSH bands (num_perm / bands rows each): 16 x 8 makes pairs above ~0.7 candidates."""
    shingle: int = 5
    """Words per shingle."""
    seed: int = 0
    """Seed of the hash permutations (a run is deterministic for a given seed)."""


@dataclass
class DataConfig:
    inputs: list[str] = field(default_factory=lambda: ["builtin"])
    """Files, directories or globs to prepare; "builtin" is the built-in Shakespeare corpus."""
    val_inputs: list[str] = field(default_factory=list)
    """Files held out whole for validation; when given, val_fraction is not used and every
    document of `inputs` goes to training."""
    shards: str | None = None
    """An already prepared shard directory; None = prepare data.inputs into RUN/data."""
    text_field: str = "text"
    """JSONL field / Parquet column holding the text."""
    separator: str | None = None
    """Split plain-text files into documents at this string (None: a file is a document)."""
    errors: str = "strict"
    """Invalid UTF-8: "strict" stops with the file and offset, "replace" uses U+FFFD."""
    val_fraction: float = 0.01
    """Share of documents (chosen by a hash of their text) held out for validation."""
    shard_tokens: int = 50_000_000
    """Tokens per shard file."""
    workers: int = 0
    """Worker processes for cleaning, filtering and tokenizing (0 = one per CPU core; 1 = all
    in this process)."""
    batch_docs: int = 256
    """Most documents per task sent to a worker (fewer when they are long: BATCH_CHARS)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Clean-up and quality filters."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near-duplicate removal."""
