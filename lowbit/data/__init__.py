"""Calibration and evaluation text: bundled corpora, local files, local HF datasets."""

from lowbit.data.calibration import CalibrationSet, calibration_batch, calibration_set
from lowbit.data.corpora import (
    BUNDLED_CORPORA,
    CorpusInfo,
    list_corpora,
    load_text,
    text_sha256,
)
from lowbit.data.tokens import clear_token_cache, tokenize_text, tokenizer_adds_bos

__all__ = [
    "BUNDLED_CORPORA",
    "CalibrationSet",
    "CorpusInfo",
    "calibration_batch",
    "calibration_set",
    "clear_token_cache",
    "list_corpora",
    "load_text",
    "text_sha256",
    "tokenize_text",
    "tokenizer_adds_bos",
]
