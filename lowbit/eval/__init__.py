"""Evaluation: paper-protocol perplexity, KL divergence to the base model."""

from lowbit.eval.kld import KLDResult, kl_divergence, token_kl
from lowbit.eval.perplexity import PerplexityResult, corpus_perplexity, perplexity, token_nll
from lowbit.eval.windows import eval_windows

__all__ = [
    "KLDResult",
    "PerplexityResult",
    "corpus_perplexity",
    "eval_windows",
    "kl_divergence",
    "perplexity",
    "token_kl",
    "token_nll",
]
