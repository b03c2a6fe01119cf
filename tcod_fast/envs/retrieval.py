"""BM25 retrieval over a list of texts, on the ``bm25s`` library.

WebShop ranks products and Search-QA ranks passages with BM25, as their reference setups do
(WebShop's search engine is a Lucene BM25 index through pyserini; Search-R1 offers BM25 as its
sparse retriever). ``bm25s`` is a BM25 implementation in NumPy with sparse score matrices: its
only required dependency is NumPy (no Java, no index files written to disk), it indexes a few
thousand documents in milliseconds, and it is maintained. Scoring is Lucene's BM25 variant
(``k1=1.5``, ``b=0.75``), with English stop words removed and no stemming (a stemmer would need
another package).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BM25Index"]


class BM25Index:
    """A BM25 index of ``texts``; :meth:`search` returns their positions, best first.

    Args:
        texts: the documents, indexed by position.
    """

    def __init__(self, texts: Sequence[str]):
        import bm25s

        if not texts:
            raise ValueError("a BM25 index needs at least one text, got none")
        self._bm25s = bm25s
        self._size = len(texts)
        self._retriever = bm25s.BM25()
        self._retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def __len__(self) -> int:
        return self._size

    def search(self, query: str, k: int) -> list[int]:
        """Positions of the ``k`` best-scoring texts for ``query``, best first.

        Texts that share no word with the query are left out; ties keep index order, so
        the ranking is the same on every run.
        """
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        if not tokens or k <= 0:
            return []
        import numpy as np

        scores = np.asarray(self._retriever.get_scores(tokens))
        order = np.lexsort((np.arange(self._size), -scores))  # by score, then by position
        return [int(i) for i in order[:k] if scores[i] > 0]
