"""The one registry of retrieval schemes: what each is, how it is computed and how it is drawn.

The runner, the report, the figures, the config's ``ablations`` key and the CLI all read
:data:`SCHEMES`, so adding a scheme is one :class:`Scheme` entry below. Order matters: it is the
order of the rows of every table and the lines of every figure.

==========  ======================================================================
scheme      what
==========  ======================================================================
1           Ori features, Euclidean
1h          Ori + gain ratio selection + sample-mean hash, Hamming
2           DFS-Net features, Euclidean
3           DFS-Net + gain ratio selection + sample-mean hash, Hamming
3-random    Scheme 3 with random selection instead of gain ratio (ablation)
3-fmean     Scheme 3 with a per-feature mean threshold (ablation)
3-fmedian   Scheme 3 with a per-feature median threshold (ablation)
itq         DFS-Net features + ITQ (no selection) (ablation)
1-csq       Ori trained with CSQ hash heads: the head's codes, Hamming (beyond the paper)
3-csq       DFS-Net trained with CSQ hash heads: the head's codes, Hamming (beyond the paper)
3h-itq      ITQ on the features of the DFS-Net trained with hash heads (ablation)
==========  ======================================================================

The hash heads (one linear layer on the pooled feature per code length b, exported as
:class:`dfsnet.hashing.LinearHasher`) train jointly with the classifier, CE + CSQ loss, in one
network per backbone (``dfs_h``, ``ori_h``); Schemes 1-3 keep the networks without them.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Scheme", "SCHEMES", "NETWORKS", "HASH_NETWORKS", "ablation_names", "ablation_schemes", "enabled_schemes",
           "float_schemes", "hashed_schemes", "scheme_entries"]

#: Network keys, in training order: the paper's plain network ("Ori") and DFS-Net, then the same two
#: trained with learned hash heads beside the classifier (one CSQ head per code length, jointly).
NETWORKS = {"ori": "Ori", "dfs": "DFS-Net", "ori_h": "Ori + hash heads", "dfs_h": "DFS-Net + hash heads"}
#: The networks trained with hash heads, and the plain network each mirrors.
HASH_NETWORKS = {"ori_h": "ori", "dfs_h": "dfs"}


@dataclass(frozen=True)
class Scheme:
    """One retrieval scheme.

    Attributes
    ----------
    id : str
        Its key in results rows and tables (``"3"``, ``"3-random"``).
    description : str
        One line, for the tables.
    network : {"ori", "dfs"}
        Whose features it ranks.
    selector, hasher : str or None
        :func:`dfsnet.eval.retrieval_eval`'s selector and hasher; ``hasher=None`` means the
        float features ranked by Euclidean distance.
    ablation : str or None
        Its name in the config's ``ablations`` list; None for the paper's schemes, which
        always run.
    color, marker, linestyle
        Matplotlib style of its line in the figures.
    short : str
        Parenthesised in the label of a float scheme ("Scheme 1 (Ori, Euclidean)").
    pr_curve : bool
        Drawn in the precision-recall figure (hashed ones at the config's ``pr_bits``).
    headline : bool
        Shown in the tie-mode and time/memory tables.
    step : tuple of (str, str, str), optional
        ``(what, a, b)``: a row of the "what each step adds" table, mAP of ``a`` minus ``b``;
        ``what`` may hold ``{b}`` for the code length.
    paper_metric : str, optional
        A :mod:`dfsnet.experiments.paper` metric compared with this scheme's best code length.
    max_bits : str, optional
        ``"itq"``: code lengths are capped at the config's ``itq_max_bits`` and the number of
        train images (ITQ's PCA has no more axes).
    learned : bool
        The codes of a hash head trained with the network (``hasher`` names its loss); scored
        by the runner itself rather than :func:`dfsnet.eval.retrieval_eval`. Code lengths are
        capped at the config's ``learned_max_bits``.
    """

    id: str
    description: str
    network: str
    selector: str | None = None
    hasher: str | None = None
    ablation: str | None = None
    color: str = "black"
    marker: str | None = None
    linestyle: str = "-"
    short: str = ""
    pr_curve: bool = False
    headline: bool = False
    step: tuple[str, str, str] | None = None
    paper_metric: str | None = None
    max_bits: str | None = None
    learned: bool = False

    @property
    def metric(self) -> str:
        """``"euclidean"`` for float features, else ``"hamming"``."""
        return "euclidean" if self.hasher is None else "hamming"

    @property
    def label(self) -> str:
        """``"Scheme 3"``: how tables and legends name it."""
        return f"Scheme {self.id}"

    def style(self) -> dict[str, object]:
        """Matplotlib keywords of its line."""
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle}


SCHEMES: dict[str, Scheme] = {s.id: s for s in (
    Scheme("1", "Ori features, Euclidean", "ori", color="tab:gray", linestyle="--", short="Ori, Euclidean",
           pr_curve=True, headline=True),
    Scheme("1h", "Ori + gain ratio + sample-mean hash, Hamming", "ori", "gain_ratio", "sample_mean",
           color="tab:gray", marker="o", pr_curve=True, headline=True),
    Scheme("2", "DFS-Net features, Euclidean", "dfs", color="tab:blue", linestyle="--", short="DFS-Net, Euclidean",
           pr_curve=True, headline=True, step=("DFS module, float features", "2", "1")),
    Scheme("3", "DFS-Net + gain ratio + sample-mean hash, Hamming", "dfs", "gain_ratio", "sample_mean",
           color="tab:blue", marker="o", pr_curve=True, headline=True,
           step=("DFS module, hashed at {b} bits", "3", "1h"), paper_metric="map_scheme3_best"),
    Scheme("3-random", "Scheme 3, random selection instead of gain ratio", "dfs", "random", "sample_mean",
           ablation="random", color="tab:orange", marker="s",
           step=("gain ratio vs random selection at {b} bits", "3", "3-random")),
    Scheme("3-fmean", "Scheme 3, per-feature mean threshold", "dfs", "gain_ratio", "feature_mean",
           ablation="feature_mean", color="tab:green", marker="^",
           step=("sample-mean vs feature-mean threshold at {b} bits", "3", "3-fmean")),
    Scheme("3-fmedian", "Scheme 3, per-feature median threshold", "dfs", "gain_ratio", "feature_median",
           ablation="feature_median", color="tab:olive", marker="v",
           step=("sample-mean vs feature-median threshold at {b} bits", "3", "3-fmedian")),
    Scheme("itq", "DFS-Net features + ITQ rotation (no selection), Hamming", "dfs", None, "itq",
           ablation="itq", color="tab:red", marker="D", headline=True,
           step=("gain ratio + hash vs ITQ at {b} bits", "3", "itq"), max_bits="itq"),
    Scheme("1-csq", "Ori trained with a CSQ hash head, its codes, Hamming", "ori_h", None, "csq",
           color="tab:purple", marker="x", linestyle=":", headline=True, learned=True),
    Scheme("3-csq", "DFS-Net trained with a CSQ hash head, its codes, Hamming", "dfs_h", None, "csq",
           color="tab:purple", marker="P", pr_curve=True, headline=True, learned=True,
           step=("learned CSQ hash head vs ITQ on DFS-Net at {b} bits", "3-csq", "itq")),
    Scheme("3h-itq", "ITQ on the features of DFS-Net trained with hash heads, Hamming", "dfs_h", None, "itq",
           ablation="itq_hash_features", color="tab:pink", marker="*", max_bits="itq",
           step=("CSQ hash head vs ITQ on the same features at {b} bits", "3-csq", "3h-itq")),
)}


def float_schemes() -> list[Scheme]:
    """The Euclidean (float feature) schemes, in registry order."""
    return [s for s in SCHEMES.values() if s.metric == "euclidean"]


def hashed_schemes() -> list[Scheme]:
    """The Hamming (hashed) schemes, in registry order."""
    return [s for s in SCHEMES.values() if s.metric == "hamming"]


def ablation_schemes() -> dict[str, Scheme]:
    """``{ablation name: scheme}`` of the schemes a config turns on with ``ablations``."""
    return {s.ablation: s for s in SCHEMES.values() if s.ablation is not None}


def ablation_names() -> list[str]:
    """Valid entries of the config's ``ablations`` list, in registry order."""
    return list(ablation_schemes())


def enabled_schemes(ablations) -> list[Scheme]:
    """The paper's schemes and the ablations named in ``ablations``, in registry order."""
    chosen = set(ablations)
    return [s for s in SCHEMES.values() if s.ablation is None or s.ablation in chosen]


def scheme_entries() -> dict[str, dict[str, str | None]]:
    """The ``schemes`` table of ``results.json``: what each id means."""
    return {sid: {"description": s.description, "network": s.network, "selector": s.selector,
                  "hasher": s.hasher, "metric": s.metric} for sid, s in SCHEMES.items()}
